"""One benchmark of one artifact in a fresh process, so peak memory belongs to that artifact.

Prints one JSON object on stdout. Run by runtime_bench.host; not a user-facing command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _status_mb(key: str) -> float:
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec and so would report the
    # parent's peak (the Python that spawned this process) instead of this benchmark's.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch  # noqa: F401  (the ExecuTorch bindings need it loaded; count it in the baseline)
    from pocketformer.export.runtimes import RUNNERS
    from pathlib import Path

    torch.set_num_threads(a.threads)
    with np.load(a.inputs) as z:
        inputs = [z[k] for k in z.files]
    runner_cls = RUNNERS[Path(a.artifact).suffix]
    if runner_cls.runtime == "executorch":
        inputs = [torch.from_numpy(x) for x in inputs]
    runner_cls.import_runtime()
    baseline = _status_mb("VmRSS")

    t0 = time.perf_counter()
    runner = runner_cls(a.artifact, a.threads)
    load_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    out = runner(*inputs)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(a.warmup):
        runner(*inputs)
    lat = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        runner(*inputs)
        lat.append((time.perf_counter() - t0) * 1e3)
    out = np.asarray(out, dtype=np.float64)
    json.dump({
        "runtime": runner_cls.runtime,
        "load_ms": load_ms,
        "first_inference_ms": first_ms,
        "latencies_ms": lat,
        "peak_rss_mb": _status_mb("VmHWM"),
        "baseline_rss_mb": baseline,
        "output_checksum": float(out.sum()),
        "output_shape": list(out.shape),
    }, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
