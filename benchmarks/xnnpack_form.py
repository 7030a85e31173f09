"""The .pte forward program with and without its XNNPACK form (models/xnnpack_form.py), side by
side on one model: partitions, nodes left to portable kernels, export (lowering) time, parity
against eager, file size, and host latency in the native runner. Latency is measured in rounds,
each timing both programs once in alternating order; the ratio printed is the median of the
per-round ratios (what moves a p50 on a shared machine is drift between minutes, which a ratio
within one round cancels). A benchmark that prints figures, not a test.

    .venv/bin/python benchmarks/xnnpack_form.py minilm [--seq-len 128] [--rounds 5] [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from pocketformer.export import ExportConfig, export_model
from pocketformer.models import load_model
from pocketformer.runtime_bench import BenchConfig, bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="built-in name or model directory")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--quantize", default="fp32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="keep the programs here (default: a temporary directory)")
    ap.add_argument("--json")
    args = ap.parse_args()

    loaded = load_model(args.model)
    out = Path(args.out or tempfile.mkdtemp(prefix="xnnpack_form_"))
    rows = {}
    for label, form in (("model's own", False), ("xnnpack form", True)):
        cfg = ExportConfig(formats=["pte"], quantize=args.quantize, seq_len=args.seq_len,
                           etrecord=False, generation=False, min_delegated_flops=None,
                           xnnpack_form=form)
        where = out / ("form" if form else "own")
        (rec,) = export_model(loaded, where, cfg)
        d = rec.details["delegation"]
        rows[label] = {"path": str(where / rec.path),
                       "partitions": d["partitions"], "portable_nodes": d["portable_nodes"],
                       "portable_ops": sorted(d["portable_ops"]), "export_s": rec.export_seconds,
                       "size_mb": round(rec.size_bytes / 1e6, 3), "parity": rec.parity}
    bcfg = BenchConfig(targets=["host"], runs=args.runs, warmup=5, threads=args.threads)
    labels = list(rows)
    p50 = {k: [] for k in labels}
    for r in range(args.rounds):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            (res,) = bench([rows[label]["path"]], bcfg)
            p50[label].append(res.latency_ms["p50"])
    ratios = [own / form for own, form in zip(p50[labels[0]], p50[labels[1]])]
    for label in labels:
        rows[label]["p50_ms_rounds"] = [round(x, 3) for x in p50[label]]
        rows[label]["p50_ms"] = round(statistics.median(p50[label]), 3)
    print(f"{args.model}, seq {args.seq_len}, {args.quantize}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.runs} runs (native runner, host)")
    print(f"{'program':14} {'partitions':>10} {'portable':>9} {'export s':>9} {'size MB':>8} "
          f"{'cos':>9} {'max abs':>9} {'p50 ms':>8}")
    for label, row in rows.items():
        print(f"{label:14} {row['partitions']:>10} {row['portable_nodes']:>9} {row['export_s']:>9.1f} "
              f"{row['size_mb']:>8.2f} {row['parity']['cosine']:>9.6f} "
              f"{row['parity']['max_abs_diff']:>9.2e} {row['p50_ms']:>8.2f}")
    speedup = statistics.median(ratios)
    print(f"latency, model's own / xnnpack form: {speedup:.3f}x (median of per-round ratios "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seq_len": args.seq_len,
                                               "quantize": args.quantize, "threads": args.threads,
                                               "rows": rows, "ratios": ratios,
                                               "speedup": speedup}, indent=1))


if __name__ == "__main__":
    main()
