"""What one decode step's linears cost in XNNPACK on this CPU, by weight scheme. One SmolLM2
layer's seven projections (q 576->576, k and v 576->192, o 576->576, gate and up 576->1536,
down 1536->576), stacked `--layers` times, lowered to XNNPACK and run on one token (M = 1) in
ExecuTorch's Python bindings. Schemes:

- fp32;
- 8da4w group 32 (what the grid / Q4_1-grid export ships; XNNPACK's blockwise qb4w kernels);
- 8da4w per output channel, the export's path (`--group-size 0`: torchao's per-axis int4,
  lowered under export/quantize.py's `xnnpack_int4_per_channel`: XNNPACK's qc4w kernels);
- the same weights lowered as ExecuTorch 1.x lowers them by itself ("-qb4w": block-wise qb4w
  kernels, one block per row, bf16 scales; what the export shipped before 2026-12-05);
- 8da4w per output channel through ExecuTorch's own PT2E quantizer (XNNPACKQuantizer, dynamic
  activations, weights in [-8, 7] per channel; "-pt2e"), which XNNPACK runs with qc4w too;
- 8da8w per output channel (int8 weights; XNNPACK's qc8w kernels).

The ratios between schemes on one CPU say how much of a decode step the 4-bit group-wise
kernels themselves cost there (docs/llm_race.md). A benchmark that prints figures, not a test.

    .venv/bin/python benchmarks/xnnpack_decode_linears.py [--layers 22] [--threads 2] [--runs 200]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

SHAPES = (("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576),
          ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576))


class Stack(nn.Module):
    """The projections of `layers` layers applied in sequence, each on the running activation
    where shapes allow (so XNNPACK cannot fuse or skip any of them)."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({n: nn.Linear(i, o, bias=False) for n, i, o in SHAPES}) for _ in range(layers))

    def forward(self, x):
        for l in self.layers:
            h = l["o"](l["q"](x)) + l["k"](x).sum(-1, keepdim=True) + l["v"](x).sum(-1, keepdim=True)
            x = x + l["down"](l["gate"](h) * l["up"](h))
        return x


def _pt2e_qc4w(model: nn.Module, x: torch.Tensor):
    """ExecuTorch's PT2E flow: dynamic int8 activations, int4 weights per output channel."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True, is_dynamic=True, weight_qmin=-8, weight_qmax=7))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    prepared(x)
    return torch.export.export(convert_pt2e(prepared), (x,))


def lower(model: nn.Module, scheme: str):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from pocketformer.export.quantize import quantize_for_executorch, xnnpack_int4_per_channel

    x = torch.randn(1, 1, 576)
    if scheme == "8da4w-channel-pt2e":
        ep = _pt2e_qc4w(model, x)
    else:
        # the export's own path (export/quantize.py): "int8" is 8da8w per output channel, 8da4w
        # group 0 one 4-bit scale per output channel (`--group-size 0`)
        model, _ = quantize_for_executorch(model, "fp32" if scheme == "fp32" else
                                           "int8" if scheme == "8da8w" else "8da4w",
                                           group_size=32 if scheme == "8da4w-g32" else 0)
        ep = torch.export.export(model, (x,))
    lowering = contextlib.nullcontext() if scheme == "8da4w-channel-qb4w" else xnnpack_int4_per_channel()
    with lowering:
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    buffer = edge.to_executorch().buffer
    # the loaded program reads the buffer in place: keep it alive as long as the module
    return _load_for_executorch_from_buffer(buffer), x, buffer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(args.threads)
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    isa = [f for f in ("avx2", "avx512f", "avx512vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    print(f"CPU ISA: {' '.join(isa)}; {args.layers} layers x 7 projections, M = 1, "
          f"{args.threads} threads")
    weights = sum(i * o for _, i, o in SHAPES) * args.layers
    res = {}
    for scheme in ("fp32", "8da4w-g32", "8da4w-channel", "8da4w-channel-qb4w", "8da4w-channel-pt2e", "8da8w"):
        torch.manual_seed(0)
        module, x, _buffer = lower(Stack(args.layers).eval(), scheme)
        for _ in range(10):
            module.forward((x,))
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            module.forward((x,))
            times.append((time.perf_counter() - t) * 1e3)
        res[scheme] = statistics.median(times)
        bits = {"fp32": 32, "8da8w": 8}.get(scheme, 4)
        print(f"{scheme:19s} median {res[scheme]:.3f} ms per token "
              f"({weights * bits / 8 / 1e6 / res[scheme]:.1f} GB/s of weights)", flush=True)
    base = res["8da4w-g32"]
    print("relative to 8da4w group 32: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in res.items()))


if __name__ == "__main__":
    main()
