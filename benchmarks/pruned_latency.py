"""Does pruning buy the speed its FLOPs promise? Host latency of pruned exports against the dense
one, side by side in one run (a benchmark, not a test).

    .venv/bin/python benchmarks/pruned_latency.py --dense smollm2 PRUNED_DIR [PRUNED_DIR...] \
        [--format pte] [--seq-len 128] [--runs 20] [--threads 2]

For each model: export (fp32, XNNPACK for .pte), benchmark on the host, and print
latency ratio (pruned p50 / dense p50) next to the FLOP ratio; the target is latency ratio <=
1.1 x FLOP ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pocketformer import fsutil
from pocketformer.export import ExportConfig, export_model
from pocketformer.models import load_model
from pocketformer.runtime_bench import BenchConfig, bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", required=True)
    p.add_argument("pruned", nargs="+")
    p.add_argument("--format", default="pte")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pf-pruned-latency-"))
    rows = []
    artifacts = []
    for i, source in enumerate([a.dense, *a.pruned]):
        loaded = load_model(source)
        flops = loaded.adapter.flops(loaded.model, a.seq_len)
        out = work / f"m{i}"
        (record,) = export_model(loaded, out, ExportConfig(formats=[a.format], seq_len=a.seq_len))
        artifacts.append(out / record.path)
        rows.append({"model": source, "flops": flops, "params": loaded.adapter.describe(loaded.model)["params"]})
        del loaded
    # every artifact measured in the same run, one after the other, with the same settings
    results = bench(artifacts, BenchConfig(warmup=a.warmup, runs=a.runs, threads=a.threads))
    for row, r in zip(rows, results):
        row["p50"] = r.latency_ms["p50"]
    dense = rows[0]
    lines = ["| model | params | GFLOP/forward | FLOP ratio | p50 ms | latency ratio | latency / FLOP ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        fr = row["flops"] / dense["flops"]
        lr = row["p50"] / dense["p50"]
        lines.append(f"| {row['model']} | {row['params']:,} | {row['flops'] / 1e9:.2f} | {fr:.3f} | "
                     f"{row['p50']:.2f} | {lr:.3f} | {lr / fr:.3f} |")
    table = "\n".join(lines)
    print(f"\n{a.format}, 1 x {a.seq_len} tokens, {a.threads} threads, {a.runs} runs\n{table}")
    if a.markdown:
        fsutil.write_text(a.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
