"""Does bf16 autocast make a training step cheaper on this CPU? One SmolLM2-sized FFN
(576 -> 1536 -> 576, SiLU) forward + backward on 4 x 256 tokens, fp32 against CPU bf16 autocast,
and what oneDNN says about native bf16 (`precision = "auto"` follows that answer:
compress/recovery.py, native_bf16). A benchmark that prints figures, not a test.

    .venv/bin/python benchmarks/bf16_autocast_step.py [--threads 2] [--runs 10]
"""
from __future__ import annotations

import argparse
import time

import torch

from pocketformer.compress.recovery import native_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576))
    x = torch.randn(4 * 256, 576, requires_grad=True)
    ms = {}
    for precision in ("fp32", "bf16"):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = ffn(x).float().pow(2).mean()
            loss.backward()
        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(args.runs):
            step()
        ms[precision] = (time.perf_counter() - start) / args.runs * 1000
        print(f"{precision}: {ms[precision]:.1f} ms per forward + backward")
    print(f"bf16 / fp32 step time: {ms['bf16'] / ms['fp32']:.2f}x; "
          f"native bf16 on this CPU (oneDNN): {native_bf16(torch.device('cpu'))}; "
          f"precision 'auto' runs {'bf16' if native_bf16(torch.device('cpu')) else 'fp32'} here")


if __name__ == "__main__":
    main()
