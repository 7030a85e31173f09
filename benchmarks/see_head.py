"""The tied LM head, dense against SEE's factored form: parameters, bytes, and latency/memory of
the head alone, in eager PyTorch and as an XNNPACK `.pte` run by the native ExecuTorch runner.

    python benchmarks/see_head.py --see OUT/model [--dense smollm2] [--tokens 1,128] [--json F]

The dense head is the original model's `V x d` table as `nn.Linear(d, V)`; the factored head is
the SEE model's `EntangledHead` (logits from the small tables, the `V x d` matrix never formed;
docs/see.md). Same inputs (seeded hidden states), same thread count, one process; the `.pte`
figures come from `pf-et-bench` (median of `--runs` after `--warmup`, peak RSS of the process).
At one position the SEE head's `.pte` stores its term weights, as a generation program's does
(`stored_term_weights`, docs/see.md); the eager figure rebuilds them on each call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketformer.cli import _quiet_libraries  # noqa: E402


def _eager_ms(module, x, runs: int) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(3):
            module(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--see", required=True, help="model directory whose embedding/head SEE rebuilt")
    p.add_argument("--dense", default="smollm2")
    p.add_argument("--tokens", default="1,128", help="positions per call (decode step, prefill)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    _quiet_libraries()

    import numpy as np
    import torch
    from torch import nn

    from pocketformer import fsutil
    from pocketformer.export import ExportConfig
    from pocketformer.export.exporters import export_pte
    from pocketformer.models import load_model
    from pocketformer.models.factored import stored_term_weights
    from pocketformer.runtime_bench.native import build_runner, npz_to_raw, run_native

    torch.set_num_threads(args.threads)
    dense = load_model(args.dense)
    see = load_model(args.see)
    d_head = dense.adapter.output_head(dense.model)
    s_head = see.adapter.output_head(see.model)
    d = d_head.in_features
    dense_head = nn.Linear(d, d_head.out_features, bias=False)
    dense_head.weight = nn.Parameter(d_head.weight.detach().clone(), requires_grad=False)
    dense_head.eval()
    s_head.eval()
    emb = see.adapter.embeddings(see.model)
    heads = {"dense": (dense_head, dense_head.weight.numel()),
             "see": (s_head, emb.param_count() if hasattr(emb, "param_count") else
                     sum(p.numel() for p in s_head.parameters()))}
    bundle = build_runner("executorch", "x86_64")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pf-see-head-") as td:
        for t in [int(x) for x in args.tokens.split(",")]:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, t, d, generator=g)
            ref = dense_head(x)
            for name, (head, params) in heads.items():
                path = Path(td) / f"{name}-{t}.pte"
                cfg = ExportConfig(etrecord=False, min_delegated_flops=None)
                # at one position the head is exported as a generation program exports it,
                # with its term weights stored (export_generation)
                held = stored_term_weights(head) if t == 1 else contextlib.nullcontext()
                with held:
                    details = export_pte(head, (x,), path, cfg)
                npz = Path(td) / f"{name}-{t}.npz"
                np.savez(npz, hidden=x.numpy())
                raw = npz_to_raw(npz, Path(td) / f"{name}-{t}-raw")
                res = run_native(bundle, path, inputs=raw, warmup=args.warmup, runs=args.runs,
                                 threads=args.threads)
                with torch.inference_mode():
                    out = head(x)
                cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
                row = {"head": name, "tokens": t, "params": int(params),
                       "pte_mb": round(path.stat().st_size / 1e6, 2),
                       "eager_ms": round(_eager_ms(head, x, args.runs), 3),
                       "pte_p50_ms": round(statistics.median(res["latencies_ms"]), 3),
                       "pte_peak_rss_mb": res["peak_rss_mb"],
                       "pte_load_ms": res.get("load_ms"),
                       "xnnpack_flops": details["delegation"].get("delegated_flops_share"),
                       "cosine_to_dense_logits": round(cos, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| head | positions | params | .pte MB | eager ms | .pte p50 ms | .pte peak RSS MB | XNNPACK FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        xn = f"{r['xnnpack_flops']:.1%}" if r["xnnpack_flops"] is not None else ""
        print(f"| {r['head']} | {r['tokens']} | {r['params']:,} | {r['pte_mb']} | {r['eager_ms']} | "
              f"{r['pte_p50_ms']} | {r['pte_peak_rss_mb']} | {xn} |")
    if args.json:
        fsutil.write_json(args.json, {"command": " ".join(sys.argv), "rows": rows,
                                      "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
