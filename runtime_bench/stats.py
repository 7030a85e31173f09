"""Latency statistics in the shape mobile benchmark tools report them (TFLite benchmark_model,
onnxruntime_perf_test, ExecuTorch minibench)."""
from __future__ import annotations

import numpy as np


def summarize(latencies_ms: list[float]) -> dict:
    x = np.asarray(latencies_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no latencies to summarize")
    cut = int(0.1 * x.size)
    trimmed = np.sort(x)[cut:x.size - cut] if x.size - 2 * cut > 0 else x
    return {
        "min": float(x.min()),
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "max": float(x.max()),
        "trimmed_mean": float(trimmed.mean()),  # 10% cut from each end, as minibench reports
    }
