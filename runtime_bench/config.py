"""What `bench` measures (the recipe's [bench] section and the CLI flags) and the result record
every target fills in the same shape."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pocketformer.errors import BadInputError

TARGET_KINDS = ("host", "qemu:<cpu>", "adb:<serial>[,<serial>...]")
RUNNERS = ("native", "python", "app")


def parse_target(target: str) -> tuple[str, str | None]:
    """'host' -> ('host', None); 'qemu:cortex-a76' -> ('qemu', 'cortex-a76'); 'adb:S' -> ('adb', 'S')."""
    kind, _, arg = target.partition(":")
    if kind == "host" and not arg:
        return "host", None
    if kind in ("qemu", "adb") and arg.strip():
        return kind, arg.strip()
    raise BadInputError(f"unsupported target {target!r}; expected one of {', '.join(TARGET_KINDS)}",
                        field="targets")


@dataclass
class BenchConfig:
    targets: list[str] = field(default_factory=lambda: ["host"])
    warmup: int = 5
    runs: int = 30
    threads: int = 2
    # native: our C++ runners (ExecuTorch Module API / ONNX Runtime C API), on every target;
    # python: the runtimes' Python bindings, host only, for comparison;
    # app: the android_demo app's benchmark mode (am start with extras), adb targets, ONNX only
    runners: list[str] = field(default_factory=lambda: ["native"])
    # decoders' -gen artifacts: prefill this many prompt tokens, then decode this many
    prompt_tokens: int = 128
    new_tokens: int = 32
    # qemu: inferences in the counted run (instruction counts repeat, so a few are enough;
    # emulation is 100-300x slower than the host)
    qemu_runs: int = 3
    # host, native runner: the measurement repeated in this many runner processes, latencies
    # pooled; between-process variation (not within-run noise) is what moves a host p50 on a
    # shared machine, and the per-process p50s are kept to show it
    processes: int = 1

    def validate(self) -> None:
        if not self.targets:
            raise BadInputError("at least one target is required", field="targets")
        kinds = [parse_target(t)[0] for t in self.targets]
        bad = [r for r in self.runners if r not in RUNNERS]
        if bad or not self.runners:
            raise BadInputError(f"unknown runner(s) {bad}; expected {', '.join(RUNNERS)}",
                                field="runners")
        if "python" in self.runners and any(k != "host" for k in kinds):
            raise BadInputError("the python runner measures the host only; use runners = "
                                "[\"native\"] for qemu: and adb: targets", field="runners")
        if "app" in self.runners and any(k != "adb" for k in kinds):
            raise BadInputError("the app runner (android_demo's benchmark mode) runs on adb: "
                                "targets only", field="runners")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or self.qemu_runs < 1:
            raise BadInputError("runs >= 1, qemu_runs >= 1, warmup >= 0 and threads >= 1 are "
                                "required", field="runs")
        if self.processes < 1:
            raise BadInputError("processes >= 1 is required", field="processes")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise BadInputError("prompt_tokens >= 1 and new_tokens >= 2 are required",
                                field="new_tokens")


@dataclass
class BenchResult:
    artifact: str
    format: str
    runtime: str
    runner: str                    # "python" or "native"
    target: str                    # host | qemu:<cpu> | adb:<serial>
    threads: int
    warmup: int
    runs: int
    load_ms: float
    first_inference_ms: float
    latency_ms: dict               # min/p50/p90/p99/mean/std/max/trimmed_mean
    inferences_per_s: float
    peak_rss_mb: float
    runtime_overhead_rss_mb: float  # peak minus the process before loading (qemu: minus an empty program)
    input_shapes: dict
    device: dict
    latencies_ms: list[float] = field(default_factory=list)
    # decoders (-gen artifacts): latencies are per decode step; prefill/TTFT/tokens per second here
    generation: dict | None = None
    # qemu: wall times are emulated (never phone latency); instructions are the comparable figure
    emulated: bool = False
    instructions_per_inference: float | None = None
    # first output values and checksums from the runner, for parity across targets
    outputs: list[dict] | None = None
    throttled: bool | None = None  # adb: a throttled run that stayed throttled after a retry
    process_p50_ms: list[float] | None = None   # host native with processes > 1: each one's p50

    def to_dict(self) -> dict:
        return asdict(self)
