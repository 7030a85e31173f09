"""Does pruning buy the speed its FLOPs promise? Host latency of pruned exports against the dense
one, side by side in one run (a benchmark, not a test).

    .venv/bin/python benchmarks/pruned_latency.py --dense smollm2 PRUNED_DIR [PRUNED_DIR...] \
        [--format pte] [--seq-len 128] [--batch 1] [--runs 20] [--threads 2] [--rounds 3] [--json OUT]

For each model: export (fp32, XNNPACK for .pte), benchmark on the host, and print
latency ratio (pruned p50 / dense p50) next to the FLOP ratio; the target is latency ratio <=
1.1 x FLOP ratio. Every round measures all the artifacts one after the other; the table gives
each round's ratio and the median over rounds, so the spread of a shared machine is visible.
`--batch` exports and measures that many inputs per call (FLOPs scale with it, ratios do not),
which separates per-call overhead from compute on models whose one forward takes under a ms.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
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
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--markdown")
    p.add_argument("--json")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pf-pruned-latency-"))
    try:
        return _run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)    # exports of a 135M model take GBs


def _run(a: argparse.Namespace, work: Path) -> int:
    rows = []
    artifacts = []
    for i, source in enumerate([a.dense, *a.pruned]):
        loaded = load_model(source)
        positions = loaded.adapter.positions(loaded.model.config, a.seq_len)
        flops = a.batch * loaded.adapter.flops(loaded.model, positions)
        out = work / f"m{i}"
        (record,) = export_model(loaded, out, ExportConfig(formats=[a.format], seq_len=a.seq_len, batch=a.batch,
                                                           generation=False, etrecord=False))
        artifacts.append(out / record.path)
        rows.append({"model": source, "positions": positions, "flops": flops, "params": loaded.adapter.describe(loaded.model)["params"]})
        del loaded
    # every artifact measured in the same run, one after the other, with the same settings
    for _ in range(a.rounds):
        results = bench(artifacts, BenchConfig(warmup=a.warmup, runs=a.runs, threads=a.threads))
        for row, r in zip(rows, results):
            row.setdefault("p50_rounds", []).append(r.latency_ms["p50"])
    dense = rows[0]
    lines = ["| model | params | MFLOP/forward | FLOP ratio | p50 ms (median of rounds) | "
             "latency ratio per round | latency ratio (median) | latency / FLOP ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        row["p50"] = statistics.median(row["p50_rounds"])
        row["flop_ratio"] = row["flops"] / dense["flops"]
        row["latency_ratio_rounds"] = [p / q for p, q in zip(row["p50_rounds"], dense["p50_rounds"])]
        row["latency_ratio"] = statistics.median(row["latency_ratio_rounds"])
        per_round = ", ".join(f"{x:.3f}" for x in row["latency_ratio_rounds"])
        lines.append(f"| {row['model']} | {row['params']:,} | {row['flops'] / 1e6:,.1f} | "
                     f"{row['flop_ratio']:.3f} | {row['p50']:.2f} | {per_round} | "
                     f"{row['latency_ratio']:.3f} | {row['latency_ratio'] / row['flop_ratio']:.3f} |")
    table = "\n".join(lines)
    print(f"\n{a.format}, {a.batch} x {rows[0]['positions']} positions, {a.threads} threads, {a.runs} runs x {a.rounds} rounds\n{table}")
    if a.markdown:
        fsutil.write_text(a.markdown, table + "\n")
    if a.json:
        fsutil.write_json(a.json, {"args": vars(a), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
