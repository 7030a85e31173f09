"""The host target through the runtimes' Python bindings (the `python` runner), each artifact in a
fresh subprocess so that peak memory belongs to it. The native runners are in bench.py."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.export import load_sidecar
from pocketformer.export.runtimes import RUNNERS
from pocketformer.progress import say
from pocketformer.runtime_bench.config import BenchConfig, BenchResult
from pocketformer.runtime_bench.stats import summarize

def host_device() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"target": "host", "machine": platform.machine(), "cpu": model,
            "logical_cores": os.cpu_count(), "os": platform.platform()}


def _inputs_file(artifact: Path, inputs: str | None) -> Path:
    if inputs:
        path = Path(inputs)
        if not path.is_file():
            raise BadInputError("inputs file not found", file=inputs)
        return path
    path = Path(f"{artifact}.inputs.npz")
    if not path.is_file():
        raise BadInputError("no inputs: this artifact has no <artifact>.inputs.npz beside it "
                            "(pocketformer export writes one); pass --inputs FILE.npz",
                            file=str(artifact))
    return path


def bench_host(artifact: str | Path, cfg: BenchConfig, *, inputs: str | None = None) -> BenchResult:
    import numpy as np

    artifact = Path(artifact)
    if not artifact.is_file():
        raise BadInputError("artifact not found", file=str(artifact))
    if artifact.suffix not in RUNNERS:
        raise BadInputError(f"unknown artifact type {artifact.suffix!r}; expected .onnx or .pte",
                            file=str(artifact))
    side = load_sidecar(artifact) or {}
    if side.get("kind") == "generation":
        return _bench_generation(artifact, cfg, side)
    inputs_path = _inputs_file(artifact, inputs)
    say(f"bench: {artifact.name} on host ({cfg.warmup} warm-up, {cfg.runs} runs, {cfg.threads} threads)")
    raw = _run_worker(artifact, cfg, ["--inputs", str(inputs_path)])
    with np.load(inputs_path) as z:
        shapes = {k: list(z[k].shape) for k in z.files}
    stats = summarize(raw["latencies_ms"])
    return BenchResult(
        artifact=str(artifact), format=artifact.suffix.lstrip("."), runtime=raw["runtime"],
        runner="python", target="host", threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs,
        load_ms=raw["load_ms"], first_inference_ms=raw["first_inference_ms"], latency_ms=stats,
        inferences_per_s=1e3 / stats["mean"], peak_rss_mb=raw["peak_rss_mb"],
        runtime_overhead_rss_mb=raw["peak_rss_mb"] - raw["baseline_rss_mb"],
        input_shapes=shapes or {i["name"]: i["shape"] for i in side.get("inputs", [])},
        device=host_device(), latencies_ms=raw["latencies_ms"])


def generation_window(artifact: Path, cfg: BenchConfig, side: dict) -> tuple[int, int]:
    """(prompt, new tokens) of a -gen benchmark: the prompt is cut to fit the exported cache."""
    max_len = side.get("max_len") or cfg.prompt_tokens + cfg.new_tokens
    prompt = min(cfg.prompt_tokens, max_len - cfg.new_tokens)
    if prompt < 1:
        raise BadInputError(f"new_tokens {cfg.new_tokens} leave no room for a prompt in the "
                            f"exported cache of {max_len} positions", file=str(artifact),
                            field="new_tokens")
    return prompt, cfg.new_tokens


def _bench_generation(artifact: Path, cfg: BenchConfig, side: dict) -> BenchResult:
    prompt, new = generation_window(artifact, cfg, side)
    say(f"bench: {artifact.name} on host: prefill {prompt} + decode {new} tokens "
        f"({cfg.warmup} warm-up, {cfg.runs} runs, {cfg.threads} threads)")
    raw = _run_worker(artifact, cfg, ["--generate", f"{prompt},{new}"])
    stats = summarize(raw["latencies_ms"])
    g = raw["generation"]
    g["ttft_ms"] = summarize(g["ttft_ms"])
    return BenchResult(
        artifact=str(artifact), format=artifact.suffix.lstrip("."), runtime=raw["runtime"],
        runner="python", target="host", threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs,
        load_ms=raw["load_ms"], first_inference_ms=raw["first_inference_ms"], latency_ms=stats,
        inferences_per_s=1e3 / stats["mean"], peak_rss_mb=raw["peak_rss_mb"],
        runtime_overhead_rss_mb=raw["peak_rss_mb"] - raw["baseline_rss_mb"],
        input_shapes={"prompt": [1, prompt]}, device=host_device(),
        latencies_ms=raw["latencies_ms"], generation=g)


def _run_worker(artifact: Path, cfg: BenchConfig, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pocketformer.runtime_bench.worker", str(artifact),
           "--warmup", str(cfg.warmup), "--runs", str(cfg.runs), "--threads", str(cfg.threads), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeFailure(f"benchmark process failed (exit {proc.returncode}): {tail}",
                             file=str(artifact), device="host")
    return json.loads(proc.stdout)
