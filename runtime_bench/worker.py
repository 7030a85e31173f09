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
    p.add_argument("--inputs")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generate", metavar="PROMPT,NEW",
                   help="a -gen artifact: time prefill of PROMPT tokens, then NEW greedy decode steps")
    a = p.parse_args(argv)
    if a.generate:
        return _generate(a)

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


def _generate(a) -> int:
    """Each run: reset, prefill a fixed prompt (time to first token), then decode NEW tokens one
    step at a time; every decode step's latency is kept, as llama-bench and minibench report."""
    import torch

    from pathlib import Path

    from pocketformer.export.runtimes import RUNNERS, open_generator

    torch.set_num_threads(a.threads)
    RUNNERS[Path(a.artifact).suffix].import_runtime()   # import time is not load time
    prompt_len, new = (int(v) for v in a.generate.split(","))
    baseline = _status_mb("VmRSS")
    t0 = time.perf_counter()
    gen = open_generator(a.artifact, a.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    vocab = gen(np.asarray([[1]], dtype=np.int64), 0).shape[-1]   # the first call, untimed
    first_call_ms = (time.perf_counter() - t0) * 1e3
    prompt = np.random.default_rng(0).integers(3, vocab, prompt_len).tolist()

    def one_run():
        gen.reset()
        t = time.perf_counter()
        logits = gen(np.asarray([prompt], dtype=np.int64), 0)
        ttft = (time.perf_counter() - t) * 1e3
        nxt, steps = int(np.argmax(logits[0, -1])), []
        for pos in range(prompt_len, prompt_len + new - 1):
            t = time.perf_counter()
            logits = gen(np.asarray([[nxt]], dtype=np.int64), pos)
            nxt = int(np.argmax(logits[0, -1]))
            steps.append((time.perf_counter() - t) * 1e3)
        return ttft, steps

    for _ in range(a.warmup):
        one_run()
    ttfts, steps = [], []
    for _ in range(a.runs):
        ttft, s = one_run()
        ttfts.append(ttft)
        steps.extend(s)
    json.dump({
        "runtime": "executorch" if a.artifact.endswith(".pte") else "onnxruntime",
        "load_ms": load_ms, "first_inference_ms": first_call_ms, "latencies_ms": steps,
        "peak_rss_mb": _status_mb("VmHWM"), "baseline_rss_mb": baseline,
        "generation": {"prompt_tokens": prompt_len, "new_tokens": new, "ttft_ms": ttfts,
                       "prefill_tokens_per_s": prompt_len / (float(np.median(ttfts)) / 1e3),
                       "decode_tokens_per_s": 1e3 / float(np.median(steps)) if steps else None},
    }, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
