"""`pocketformer bench`: every artifact on every target with every runner, one result shape.

Targets: `host` (native runners, and the Python runtimes with runners=["python"]),
`qemu:<cpu>` (the linux-aarch64 native runners under QEMU user mode: instructions per
inference from the TCG plugin, emulated wall time labelled as such), `adb:<serial>[,...]`
(the native runners pushed to each device). See docs/runtime_bench.md.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from pathlib import Path

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.export import load_sidecar
from pocketformer.progress import say
from pocketformer.runtime_bench.config import BenchConfig, BenchResult, parse_target
from pocketformer.runtime_bench.host import _inputs_file, bench_host, generation_window, host_device
from pocketformer.runtime_bench.stats import summarize

RUNTIME_OF = {".pte": "executorch", ".onnx": "onnxruntime"}
QEMU_THREADS = 1   # exact instruction counts: idle pool threads spin for timing-dependent counts
QEMU_REPEATS = 2   # each counted run is made this many times and the smallest count kept: a rare
                   # one-off in a run (seen: ONNX Runtime's main thread 0.8M and 30M instructions
                   # above its usual count) only ever adds instructions (docs/qemu_target.md)


def _check_artifact(artifact: Path) -> None:
    if not artifact.is_file():
        raise BadInputError("artifact not found", file=str(artifact))
    if artifact.suffix not in RUNTIME_OF:
        raise BadInputError(f"unknown artifact type {artifact.suffix!r}; expected .onnx or .pte",
                            file=str(artifact))


def _is_generation(artifact: Path) -> bool:
    return (load_sidecar(artifact) or {}).get("kind") == "generation"


def runner_command(binary: str, model: str, raw_inputs, *, warmup: int, runs: int, threads: int,
                   json_out: str) -> list[str]:
    """The native runners' command line (runtime_bench/native/bench_common.h)."""
    from pocketformer.runtime_bench.native import runner_args

    return [str(binary), "--model", str(model),
            *runner_args(raw_inputs, warmup=warmup, runs=runs, threads=threads), "--json", str(json_out)]


def _result(raw: dict, artifact: Path, *, runner: str, target: str, threads: int, warmup: int,
            runs: int, device: dict, shapes: dict) -> BenchResult:
    lat = raw["latencies_ms"]
    stats = summarize(lat)
    device = {**device, "runtime_version": raw.get("runtime_version"), "runner_arch": raw.get("arch")}
    return BenchResult(
        artifact=str(artifact), format=artifact.suffix.lstrip("."), runtime=RUNTIME_OF[artifact.suffix],
        runner=runner, target=target, threads=threads, warmup=warmup, runs=runs,
        load_ms=raw["load_ms"], first_inference_ms=raw["first_inference_ms"], latency_ms=stats,
        inferences_per_s=1e3 / stats["mean"] if stats["mean"] > 0 else float("inf"),
        peak_rss_mb=raw["peak_rss_mb"],
        runtime_overhead_rss_mb=raw["peak_rss_mb"] - raw.get("rss_before_load_mb", 0.0),
        input_shapes=shapes, device=device, latencies_ms=lat, outputs=raw.get("outputs"))


def _raw_inputs(artifact: Path, inputs: str | None, tmp: Path):
    from pocketformer.runtime_bench.native import npz_to_raw

    raw = npz_to_raw(_inputs_file(artifact, inputs), tmp)
    return raw, {p.stem: list(shape) for p, _, shape in raw}


def _native_failure(e: RuntimeFailure, artifact: Path, device: str) -> Exception:
    """The runner's exit 2 means the artifact or inputs are bad; anything else is a device or
    runtime failure (exit 4). Both name the file and the target."""
    kind = BadInputError if getattr(e, "returncode", None) == 2 else RuntimeFailure
    return kind(e.message, file=str(artifact), device=device)


def bench_native_host(artifact: Path, cfg: BenchConfig, *, inputs: str | None = None) -> BenchResult:
    from pocketformer.runtime_bench import native

    bundle = native.build_runner(RUNTIME_OF[artifact.suffix], "x86_64", install_missing=True)
    say(f"bench: {artifact.name} on host, native {bundle.binary.name} ({cfg.warmup} warm-up, "
        f"{cfg.runs} runs, {cfg.threads} threads)")
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as td:
        raw_inputs, shapes = _raw_inputs(artifact, inputs, Path(td))
        raws = []
        for _ in range(cfg.processes):
            try:
                raws.append(native.run_native(bundle, artifact, inputs=raw_inputs, warmup=cfg.warmup,
                                              runs=cfg.runs, threads=cfg.threads))
            except RuntimeFailure as e:
                raise _native_failure(e, artifact, "host") from e
    raw = dict(raws[0])       # load and first inference: the first process's
    raw["latencies_ms"] = [x for r in raws for x in r["latencies_ms"]]
    raw["peak_rss_mb"] = max(r["peak_rss_mb"] for r in raws)
    result = _result(raw, artifact, runner="native", target="host", threads=cfg.threads,
                     warmup=cfg.warmup, runs=cfg.runs * cfg.processes, device=host_device(),
                     shapes=shapes)
    if cfg.processes > 1:
        result.process_p50_ms = [summarize(r["latencies_ms"])["p50"] for r in raws]
    return result


def _main_count(run) -> float:
    return math.inf if run.main_thread_instructions is None else run.main_thread_instructions


def bench_qemu(artifact: Path, cpu: str, cfg: BenchConfig, *, inputs: str | None = None) -> BenchResult:
    """Two runs of the aarch64 runner that differ only in the number of timed inferences
    (1 and 1 + qemu_runs): their instruction difference is per-inference work, with loading,
    start-up and teardown cancelled (docs/qemu_target.md). Each is made QEMU_REPEATS times and
    the one with the fewest main-thread instructions kept."""
    from pocketformer.runtime_bench import native, qemu

    device = f"qemu:{cpu}"
    ctx = qemu.qemu_device(cpu)     # validates the CPU model (typed error for unknown / max)
    bundle = native.build_runner(RUNTIME_OF[artifact.suffix], "aarch64", install_missing=True)
    n = cfg.qemu_runs
    say(f"bench: {artifact.name} on {device} (emulated; counting instructions over {n} inferences)")
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as td:
        tmp = Path(td)
        raw_inputs, shapes = _raw_inputs(artifact, inputs, tmp)
        runs, counts = {}, {}
        for label, timed in (("a", 1), ("b", 1 + n)):
            made = []
            for repeat in range(QEMU_REPEATS):
                out = tmp / f"{label}{repeat}.json"
                cmd = runner_command(bundle.binary, artifact.resolve(), raw_inputs, warmup=0,
                                     runs=timed, threads=QEMU_THREADS, json_out=out)
                run = qemu.run_qemu(cmd, cpu, count_instructions=True)
                if run.returncode != 0 or not out.is_file():
                    kind = BadInputError if run.returncode == 2 else RuntimeFailure
                    raise kind(f"{bundle.binary.name} exited {run.returncode} under QEMU: "
                               f"{run.stderr.strip()[-800:]}", file=str(artifact), device=device)
                made.append((run, out))
            counts[label] = [run.main_thread_instructions for run, _ in made]
            run, out = min(made, key=lambda m: _main_count(m[0]))     # the first of equal counts
            runs[label] = (run, json.loads(out.read_text()))
        (run_a, _), (run_b, raw) = runs["a"], runs["b"]
        per_inf = qemu.per_inference(run_a, run_b, 1, 1 + n, main_thread=True)
        base = qemu.baseline(cpu)
    result = _result(raw, artifact, runner="native", target=device, threads=QEMU_THREADS, warmup=0,
                     runs=1 + n, device={**ctx, "wall_time": "emulated (QEMU TCG), not device latency"},
                     shapes=shapes)
    result.emulated = True
    result.instructions_per_inference = per_inf
    result.peak_rss_mb = qemu.rss_over_baseline_mb(run_b, base)
    result.runtime_overhead_rss_mb = result.peak_rss_mb
    result.device.update({"qemu_rss_baseline_mb": base.peak_rss_mb,
                          "instructions_counted": {"runs": [1, 1 + n],
                                                   "main_thread": [run_a.main_thread_instructions,
                                                                   run_b.main_thread_instructions],
                                                   "main_thread_repeats": [counts["a"], counts["b"]]}})
    return result


def adb_command() -> list[str]:
    """The adb client: $POCKETFORMER_ADB (e.g. an nsenter prefix for the test peer) or `adb`."""
    from pocketformer.runtime_bench.adb import default_adb

    return shlex.split(os.environ.get("POCKETFORMER_ADB", "")) or default_adb()


def bench_adb(artifact: Path, serials: str, cfg: BenchConfig, *,
              inputs: str | None = None) -> list[BenchResult]:
    from pocketformer.runtime_bench import adb
    from pocketformer.runtime_bench.native import runner_args

    serial_list = adb.parse_target(f"adb:{serials}")
    say(f"bench: {artifact.name} on {', '.join(serial_list)} over adb")
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as td:
        raw_inputs, shapes = _raw_inputs(artifact, inputs, Path(td))
        # the runner runs in the pushed directory: inputs are named by their base names there
        args = runner_args([(Path(p).name, d, shape) for p, d, shape in raw_inputs],
                           warmup=cfg.warmup, runs=cfg.runs, threads=cfg.threads)
        found = adb.bench_devices(serial_list, RUNTIME_OF[artifact.suffix], artifact, args,
                                  adb=adb_command(), inputs=[Path(p) for p, _, _ in raw_inputs])
    results = []
    for res in found:
        device = {"target": res["target"], **{k: res["device"].get(k) for k in
                                               ("abi", "model", "soc", "android", "kernel")
                                               if k in res["device"]},
                  "pinning": res["pinning"], "throttle_check": res["throttle_check"],
                  "context_before": res["context_before"], "context_after": res["context_after"],
                  "capped_at_start": res["capped_at_start"]}
        r = _result(res["runner"], artifact, runner="native", target=res["target"],
                    threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs, device=device, shapes=shapes)
        r.throttled = res["throttled"]
        results.append(r)
    return results


def _generation_result(raw: dict, artifact: Path, cfg: BenchConfig, *, target: str, threads: int,
                       warmup: int, runs: int, device: dict) -> BenchResult:
    g = raw["generation"]
    lat = g["decode_ms"]
    raw = {**raw, "latencies_ms": lat}
    r = _result(raw, artifact, runner="native", target=target, threads=threads, warmup=warmup,
                runs=runs, device=device, shapes={"prompt": [1, g["prompt_tokens"]]})
    r.outputs = None
    r.generation = {"prompt_tokens": g["prompt_tokens"], "new_tokens": g["new_tokens"],
                    "ttft_ms": summarize(g["ttft_ms"]),
                    "prefill_tokens_per_s": g["prefill_tokens_per_s"],
                    "decode_tokens_per_s": g["decode_tokens_per_s"], "tokens": g.get("tokens")}
    return r


def bench_native_generation_host(artifact: Path, cfg: BenchConfig) -> BenchResult:
    """Prefill + greedy decode inside the native runner (`--generate`): the figure measures the
    runtime with its KV cache, not a Python loop."""
    from pocketformer.runtime_bench import native

    prompt, new = generation_window(artifact, cfg, load_sidecar(artifact) or {})
    bundle = native.build_runner(RUNTIME_OF[artifact.suffix], "x86_64", install_missing=True)
    say(f"bench: {artifact.name} on host, native {bundle.binary.name} --generate {prompt},{new} "
        f"({cfg.warmup} warm-up, {cfg.runs} runs, {cfg.threads} threads)")
    try:
        raw = native.run_native_generate(bundle, artifact, prompt_tokens=prompt, new_tokens=new,
                                         warmup=cfg.warmup, runs=cfg.runs, threads=cfg.threads)
    except RuntimeFailure as e:
        raise _native_failure(e, artifact, "host") from e
    return _generation_result(raw, artifact, cfg, target="host", threads=cfg.threads,
                              warmup=cfg.warmup, runs=cfg.runs, device=host_device())


def bench_app(artifact: Path, serials: str, cfg: BenchConfig) -> list[BenchResult]:
    """The installed android_demo app benchmarks the artifact (docs/android_demo.md): the same
    JSON as the native runners, measured inside an app process (what users' apps see)."""
    from pocketformer.android import run_app_bench
    from pocketformer.runtime_bench import adb

    if artifact.suffix != ".onnx":
        raise BadInputError("the app runner runs ONNX models (ONNX Runtime's Android library)",
                            file=str(artifact), field="runners")
    results = []
    for serial in adb.parse_target(f"adb:{serials}"):
        dev = adb.Adb(serial, adb_command())
        say(f"bench: {artifact.name} in the demo app on {serial}")
        raw = run_app_bench(dev, artifact, warmup=cfg.warmup, runs=cfg.runs, threads=cfg.threads)
        results.append(_result(raw, artifact, runner="app", target=f"adb:{serial}",
                               threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs,
                               device={"target": f"adb:{serial}", "runner": "android_demo app"},
                               shapes={}))
    return results


def bench(artifacts, cfg: BenchConfig, *, inputs: str | None = None) -> list[BenchResult]:
    cfg.validate()
    artifacts = [Path(a) for a in artifacts]
    for a in artifacts:
        _check_artifact(a)
    results: list[BenchResult] = []
    for target in cfg.targets:
        kind, arg = parse_target(target)
        for runner in cfg.runners:
            for artifact in artifacts:
                gen = _is_generation(artifact)
                if runner == "python":
                    results.append(bench_host(artifact, cfg, inputs=inputs))
                elif runner == "app":
                    results.extend(bench_app(artifact, arg, cfg))
                elif gen and kind == "host":
                    results.append(bench_native_generation_host(artifact, cfg))
                elif gen:
                    raise BadInputError(f"generation programs (-gen) are benchmarked on the host "
                                        f"(and by `bench --llm` under qemu); not on {target}",
                                        file=str(artifact), field="targets")
                elif kind == "host":
                    results.append(bench_native_host(artifact, cfg, inputs=inputs))
                elif kind == "qemu":
                    results.append(bench_qemu(artifact, arg, cfg, inputs=inputs))
                else:
                    results.extend(bench_adb(artifact, arg, cfg, inputs=inputs))
    return results
