"""Distillation-loss weights of a low-rank recovery, side by side (a benchmark, not a test).

    .venv/bin/python benchmarks/recovery_loss_probe.py --model smollm2 \
        --remove 3,5,12,13,14,15,16,17 --minutes 5 --variants 1,1,1 0,1,1 0.1,1,1 \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1

One fixed layer set is removed at once (no criterion, one step), and for each variant
`hidden,ce,kd[,holdout]` a fresh copy of the pruned model gets the same low-rank recovery (rank, lr,
precision, budget, seed) against the same cached teacher targets (computed once, not charged to
the budgets), with the loss weighted by that variant: hidden-state MSE, next-token CE, KL.
Held-out perplexity after each. Prints one JSON row per variant and writes --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from pocketformer import fsutil
from pocketformer.compress import Calibration
from pocketformer.compress.recovery import PRECISIONS, DistillOptions, LowRank, TeacherTargets, distill
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, evaluate
from pocketformer.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--remove", required=True, help="layer indices removed, e.g. 3,5,12")
    p.add_argument("--minutes", type=float, default=5.0, help="recovery budget per variant")
    p.add_argument("--variants", nargs="+", default=["1,1,1"],
                   help="hidden,ce,kd weights[,held-out share of the batches (early stopping)]")
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--teacher-top-k", type=int, default=64)
    p.add_argument("--eval-max-windows", type=int, default=32)
    p.add_argument("--json")
    a = p.parse_args()

    base = load_model(a.model)
    kind = base.adapter.data_kind
    calib = Calibration(load_for(kind, DataSpec.parse(a.calibration)), seq_len=a.seq_len,
                        max_samples=a.samples, batch_size=a.batch_size)
    ev = load_for(kind, DataSpec.parse(a.evaluation))
    batches = calib.inputs(base)
    t0 = time.perf_counter()
    targets = TeacherTargets(base, batches, a.teacher_top_k)
    print(f"teacher targets: {time.perf_counter() - t0:.0f} s", flush=True)
    remove = {int(x) for x in a.remove.split(",")}
    kept = [i for i in range(len(base.adapter.layers(base.model))) if i not in remove]
    rows = []
    for variant in a.variants:
        hw, ce, kd, *rest = (float(x) for x in variant.split(","))
        holdout = rest[0] if rest else 0.0
        student = base.clone()
        student.adapter.keep_layers(student.model, kept)
        rec = distill(student, base, kept, batches,
                      DistillOptions(minutes=a.minutes, lr=a.lr, ce_weight=ce, kd_weight=kd,
                                     hidden_weight=hw, seed=1, rank=a.rank, precision=a.precision,
                                     holdout=holdout),
                      label=f"hidden {hw} ce {ce} kd {kd} holdout {holdout}", targets=targets,
                      lowrank=LowRank(a.rank, 0))
        q = evaluate(student, base.adapter.task, ev,
                     opts=EvalOptions(seq_len=a.seq_len, max_windows=a.eval_max_windows))
        row = {"hidden_weight": hw, "ce_weight": ce, "kd_weight": kd, "holdout": holdout,
               "best_step": rec.get("holdout_best_step"), "steps": rec["steps"],
               "loss_first": rec["loss_first"], "loss_last": rec["loss_last"], q.metric: q.value}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        fsutil.write_json(a.json, {"model": a.model, "args": vars(a), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
