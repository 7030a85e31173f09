"""Layer-removal criteria side by side on one model and one data set (a benchmark, not a test).

    .venv/bin/python benchmarks/layer_criteria.py --model smollm2 --remove-layers 8 \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1 \
        --criteria personalized,shortgpt,gromov,sleb,last,random [--recovery none|lsq|distill]

Every criterion gets the same calibration batches and the same recovery; quality is measured on
the evaluation slice, which no criterion sees. Prints one table and writes --json/--markdown.
"""
from __future__ import annotations

import argparse
import sys
import time

from pocketformer import fsutil
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.compress.layered_prune import _teacher_targets
from pocketformer.compress.recovery import PRECISIONS, DistillOptions, check_device, distill
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, evaluate
from pocketformer.models import count_params, load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--remove-layers", type=int, default=8)
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--task")
    p.add_argument("--criteria", default="personalized,shortgpt,gromov,sleb,last,random")
    p.add_argument("--recovery", default="none")
    p.add_argument("--recovery-minutes", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-max-windows", type=int, default=32)
    p.add_argument("--recovery-precision", choices=PRECISIONS, default="fp32",
                   help="distill: the student's forward/backward precision, for the pruned "
                        "models and --dense-recovery alike (the same budget buys the same steps)")
    p.add_argument("--teacher-top-k", type=int, default=0,
                   help="distillation against the teacher's cached top-k tokens (as the recipe option)")
    p.add_argument("--sample-fraction", type=float,
                   help="the personalized criterion's share of batches per round (recipe option)")
    p.add_argument("--device", default="cpu",
                   help="distill: the torch device of the teacher's targets and the recovery "
                        "steps (cpu, cuda, cuda:N), for the pruned models and --dense-recovery alike")
    p.add_argument("--dense-recovery", action="store_true",
                   help="also train the unpruned model with the same recovery budget")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args()

    base = load_model(a.model)
    task = a.task or base.adapter.task
    cal = load_for(base.adapter.data_kind, DataSpec.parse(a.calibration))
    ev = load_for(base.adapter.data_kind, DataSpec.parse(a.evaluation))
    opts = EvalOptions(seq_len=a.eval_seq_len, max_windows=a.eval_max_windows)
    dense_params = count_params(base.model)
    rows = []
    t = time.perf_counter()
    dense = evaluate(base, task, ev, opts=opts)
    rows.append({"criterion": "dense", "removed": [], "params_removed": 0, "quality": dense.value,
                 "ratio_to_dense": 1.0, "scoring_s": 0.0, "recovery_s": 0.0,
                 "scoring_layer_evals": 0, "scoring_head_evals": 0})
    print(f"dense {dense.metric} {dense.value:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
    method = get_method("layered-prune")
    criteria = [c for c in a.criteria.split(",") if c]
    if a.dense_recovery:
        criteria = ["dense+recovery"] + criteria
    for criterion in criteria:
        loaded = load_model(a.model)
        calib = Calibration(cal, seq_len=a.seq_len, max_samples=a.samples, batch_size=a.batch_size)
        if criterion == "dense+recovery":
            teacher = loaded.clone()
            n = len(loaded.adapter.layers(loaded.model))
            batches = calib.inputs(loaded)
            device = check_device(a.device, "--device")
            targets = _teacher_targets(teacher, batches, a.teacher_top_k, device)
            rec = distill(loaded, teacher, list(range(n)), batches,
                          DistillOptions(minutes=a.recovery_minutes, lr=a.lr,
                                         precision=a.recovery_precision, device=str(device)),
                          label="dense recovery", targets=targets)
            details = {"removed": [], "scoring_seconds": 0.0, "recovery_seconds": rec["seconds"],
                       "scoring_layer_evals": 0, "scoring_head_evals": 0}
        else:
            cfg = parse_params(method, {"remove_layers": a.remove_layers, "criterion": criterion,
                                        "recovery": a.recovery, "recovery_minutes": a.recovery_minutes,
                                        "steps": a.steps, "lr": a.lr,
                                        "recovery_precision": a.recovery_precision,
                                        "teacher_top_k": a.teacher_top_k, "device": a.device,
                                        **({"sample_fraction": a.sample_fraction}
                                           if a.sample_fraction is not None else {})})
            details = run_step(loaded, "layered-prune", cfg, calib)["details"]
        q = evaluate(loaded, task, ev, opts=opts)
        row = {"criterion": criterion, "removed": details["removed"],
               "params_removed": dense_params - count_params(loaded.model), "quality": q.value,
               "ratio_to_dense": q.value / dense.value, "scoring_s": details["scoring_seconds"],
               "recovery_s": details["recovery_seconds"],
               "scoring_layer_evals": details["scoring_layer_evals"],
               "scoring_head_evals": details["scoring_head_evals"]}
        rows.append(row)
        print(f"{criterion}: removed {row['removed']} {q.metric} {q.value:.4f} "
              f"({row['ratio_to_dense']:.3f}x dense) scoring {row['scoring_s']:.1f}s", flush=True)

    header = (f"| criterion | layers removed | params removed | {dense.metric} | x dense | "
              "scoring s | recovery s | scoring layer-evals | scoring head rows |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['removed']} | {r['params_removed']:,} | {r['quality']:.4f} | "
                     f"{r['ratio_to_dense']:.3f} | {r['scoring_s']:.1f} | {r['recovery_s']:.1f} | "
                     f"{r['scoring_layer_evals']:,} | {r['scoring_head_evals']:,} |")
    table = "\n".join(lines)
    print()
    print(table)
    blob = {"model": a.model, "task": task, "metric": dense.metric, "args": vars(a), "rows": rows}
    if a.json:
        fsutil.write_json(a.json, blob)
    if a.markdown:
        fsutil.write_text(a.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
