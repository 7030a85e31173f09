"""Embedding compression side by side: SEE with WordNet units, the same structure with random
units (each in the raw or the principal basis), and truncated SVD, at each ratio, with the same
training budget (a benchmark, not a test).

    .venv/bin/python benchmarks/see_ratios.py --model minilm --ratios 10,40 \
        --calibration ../shared/data/stsbenchmark/sts-dev.csv@0:0.5 \
        --evaluation ../shared/data/stsbenchmark/sts-dev.csv@0.5:1 [--distill-minutes 2]

Prints one table: ratio x method x quality (and x dense), with the embedding parameters and the
knowledge coverage; writes --json/--markdown. `--validation SPEC` scores a second held-out set in
the same run (its own dense figure and x dense columns), so a setting can be chosen on it and the
evaluation set read only for the chosen one. `--methods dense-adapted` adds the unfactored model
after the same stage 2 (all of it trained): with `--distill-ce-weight` the stage reads the
calibration text's labels, and that row shows what adapting to the text is worth without any
compression.
"""
from __future__ import annotations

import argparse
import sys
import time

from pocketformer import fsutil
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.compress.recovery import PRECISIONS
from pocketformer.compress.see import KNOWLEDGE_ROLES, EmbedSVDConfig, adapt_dense
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, evaluate
from pocketformer.models import load_model

# see-wordnet / see-random keep the raw basis they were first measured with (docs/see.md's
# first tables); the -principal rows are see's default now.
METHODS = {"see-wordnet": ("see", {"inventory": "wordnet", "basis": "raw"}),
           "see-random": ("see", {"inventory": "random", "basis": "raw"}),
           "see-wordnet-principal": ("see", {"inventory": "wordnet", "basis": "principal"}),
           "see-random-principal": ("see", {"inventory": "random", "basis": "principal"}),
           "svd": ("embed-svd", {})}
# not a compression: the dense model given stage 2's loss and budget (compress/see.py: adapt_dense),
# the reference that shows what --distill-ce-weight's domain adaptation is worth on its own
DENSE_ADAPTED = "dense-adapted"


def _stage2_losses(rec: dict) -> dict:
    """A stage-2 record's losses as flat row keys, the same for every row (compressed or not)."""
    return {**{f"stage2_{k}": rec[k] for k in ("ce_first", "ce_last") if k in rec},
            **{f"stage2_loss_{e}": rec.get(f"loss_{e}") for e in ("first", "last")}}


def dense_adapted(loaded, cfg: EmbedSVDConfig, calib: Calibration, task, ev, opts, dense,
                  ratio: float) -> dict:
    """The dense-adapted row: the unfactored model after stage 2's loss and budget."""
    start = time.perf_counter()
    rec = adapt_dense(loaded, cfg, calib)
    seconds = time.perf_counter() - start
    q = evaluate(loaded, task, ev, opts=opts)
    params = loaded.adapter.describe(loaded.model)["embedding_params"]
    return {"ratio": ratio, "method": DENSE_ADAPTED, "quality": q.value,
            "x_dense": q.value / dense.value, "embedding_params": params, "achieved_ratio": 1.0,
            "coverage": None, "seconds": seconds, "stage1b_steps": 0, "stage2_steps": rec["steps"],
            "teacher_replay": None, **_stage2_losses(rec), "stage1b_loss_first": None,
            "stage1b_loss_last": None}


def compressed(loaded, name: str, method: str, cfg, calib: Calibration, task, ev, opts, dense,
               ratio: float) -> dict:
    """One method's row: run it on `loaded`, then score the result on the evaluation set."""
    start = time.perf_counter()
    details = run_step(loaded, method, cfg, calib)["details"]
    seconds = time.perf_counter() - start
    q = evaluate(loaded, task, ev, opts=opts)
    row = {"ratio": ratio, "method": name, "quality": q.value, "x_dense": q.value / dense.value,
           "embedding_params": details["params_after"], "achieved_ratio": details["ratio"],
           "coverage": details.get("plan", {}).get("knowledge_coverage"),
           **({"factors": details["factors"]} if "factors" in details else {}),
           "row_error": details["stage1_rows"].get("relative_error_with_exact",
                                                  details["stage1_rows"]["relative_error"]), "seconds": seconds,
           **{f"row_error_{m}": details["stage1_rows"][f"{m}_relative_error"]
              for m in ("input_metric", "head_metric") if f"{m}_relative_error" in details["stage1_rows"]},
           **{k: details["stage1_rows"][k] for k in ("reassigned_terms", "gauge_after_sweeps")
              if k in details["stage1_rows"]},
           "stage1b_steps": details["stage1_hidden"]["steps"],
           "stage2_steps": details["stage2_distill"]["steps"],
           "teacher_replay": details.get("teacher_replay"),
           **_stage2_losses(details["stage2_distill"]),
           **{f"stage1b_loss_{e}": details["stage1_hidden"].get(f"loss_{e}") for e in ("first", "last")}}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--ratios", default="10,40")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"any of {', '.join(METHODS)}, and {DENSE_ADAPTED} (the dense model after "
                        "stage 2's loss and budget, no compression)")
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--validation", help="a second held-out set scored in the same run, to choose "
                                        "settings on (never the calibration text)")
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-minutes", type=float, default=0.5)
    p.add_argument("--distill-minutes", type=float, default=2.0)
    p.add_argument("--max-passes", type=float, default=None,
                   help="stages 1b and 2 each stop after this many passes over the calibration "
                        "batches even with minutes left (see/embed-svd max_passes)")
    p.add_argument("--eval-max-windows", type=int, default=32)
    p.add_argument("--distill-hidden-weight", type=float, default=0.0,
                   help="stage 2 adds this x the last-hidden-state loss (both methods)")
    p.add_argument("--distill-relation-weight", type=float, default=0.0,
                   help="stage 2 adds this x the loss between the batch's sentence-to-sentence "
                        "cosine matrices (encoders; both methods)")
    p.add_argument("--distill-ce-weight", type=float, default=0.0,
                   help="stage 2 adds this x the next-token cross-entropy on the calibration "
                        "text (decoders; both methods; compare with --methods dense-adapted)")
    p.add_argument("--row-anchor", type=float, default=0.0,
                   help="stages 1b and 2 add this x the relative error of rows drawn from the "
                        "whole vocabulary (both methods)")
    p.add_argument("--train-scope", default="embedding",
                   help="stages 1b and 2 train the embedding, + the norms, or all (both methods)")
    p.add_argument("--distill-lr", type=float, default=1e-3,
                   help="stages 1b and 2: Adam's rate for the new embedding's parameters")
    p.add_argument("--scope-lr", type=float, default=1e-4,
                   help="learning rate of what --train-scope adds (both methods)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="stages 1b and 2: the student under bf16 autocast (both methods)")
    p.add_argument("--device", default="cpu",
                   help="stages 1b and 2 and the head metric's pass run on this torch device: "
                        "cpu, cuda or cuda:N (both methods)")
    p.add_argument("--b-share", type=float, default=0.5, help="see: share of the unit tables for B")
    p.add_argument("--max-rank", type=int, help="see: rank terms per token (default: see's)")
    p.add_argument("--fill-rank", action="store_true",
                   help="see: slots a token's senses leave free take data-driven units")
    p.add_argument("--reassign-rounds", type=int,
                   help="see: stage-1a rounds choosing units by the fit (default: see's reassign_rounds)")
    p.add_argument("--knowledge-role", choices=KNOWLEDGE_ROLES,
                   help="see: init lets the rounds move WordNet's A units, fixed keeps them "
                        "(default: see's knowledge_role)")
    p.add_argument("--no-balance-units", action="store_true",
                   help="see: leave the units in the gauge stage 1a's fit left them in (balance_units off)")
    p.add_argument("--order", type=int, default=2, choices=[2, 3],
                   help="see: Kronecker factors per term (3: A (x) B (x) C)")
    p.add_argument("--basis-dim", type=int, help="see with a principal basis: its width d' (default: see's)")
    p.add_argument("--frequency-weight", type=float, default=0.0,
                   help="stage 1a row weights from calibration counts (see and svd alike)")
    p.add_argument("--exact-share", type=float, default=0.0,
                   help="share of the budget spent on exact rows of the calibration's most "
                        "frequent tokens (see and svd alike)")
    p.add_argument("--tier-share", type=float, default=0.0,
                   help="share of the budget spent on a low-rank tier for the next most frequent "
                        "tokens after the exact rows (see and svd alike)")
    p.add_argument("--tier-rank", type=int, default=192, help="the tier's rank (see and svd alike)")
    p.add_argument("--head-metric", type=float, default=0.0,
                   help="tied heads: fit the rows in the head-input metric (see and svd alike)")
    p.add_argument("--head-metric-batches", type=int, default=None,
                   help="calibration batches the head metric's moment is measured on (default: all)")
    p.add_argument("--input-metric", type=float, default=0.0,
                   help="fit the rows in the metric of the output's sensitivity to an input row "
                        "(share beta of it, 0-1)")
    p.add_argument("--input-metric-batches", type=int, default=16,
                   help="calibration batches the input metric's probes run on")
    p.add_argument("--seed", type=int, default=0, help="every method's seed (units, init, batches)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args()

    base = load_model(a.model)
    task = base.adapter.task
    cal = load_for(base.adapter.data_kind, DataSpec.parse(a.calibration))
    ev = load_for(base.adapter.data_kind, DataSpec.parse(a.evaluation))
    opts = EvalOptions(seq_len=256, max_windows=a.eval_max_windows)
    val = load_for(base.adapter.data_kind, DataSpec.parse(a.validation)) if a.validation else None
    dense = evaluate(base, task, ev, opts=opts)
    dense_val = evaluate(base, task, val, opts=opts) if val is not None else None
    print(f"dense {dense.metric} {dense.value:.4f}"
          + (f", validation {dense_val.value:.4f}" if dense_val else ""), flush=True)
    rows = [{"ratio": 1.0, "method": "dense", "quality": dense.value, "x_dense": 1.0,
             "embedding_params": base.adapter.describe(base.model)["embedding_params"],
             "coverage": None, "seconds": 0.0}]
    if dense_val is not None:
        rows[0].update(validation=dense_val.value, validation_x_dense=1.0)
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for name in a.methods.split(","):
            if name not in METHODS and name != DENSE_ADAPTED:
                p.error(f"--methods: unknown {name!r}; expected {', '.join([*METHODS, DENSE_ADAPTED])}")
            # dense-adapted takes the options see and embed-svd share (EmbeddingStages)
            method, extra = METHODS.get(name, ("embed-svd", {}))
            loaded = load_model(a.model)
            params = {"ratio": ratio, "hidden_minutes": a.hidden_minutes,
                      "distill_minutes": a.distill_minutes, "max_passes": a.max_passes,
                      "frequency_weight": a.frequency_weight,
                      "distill_hidden_weight": a.distill_hidden_weight, "row_anchor": a.row_anchor,
                      "distill_relation_weight": a.distill_relation_weight,
                      "distill_ce_weight": a.distill_ce_weight,
                      "train_scope": a.train_scope, "scope_lr": a.scope_lr, "distill_lr": a.distill_lr,
                      "precision": a.precision,
                      "device": a.device,
                      "exact_share": a.exact_share, "head_metric": a.head_metric,
                      "head_metric_batches": a.head_metric_batches,
                      "tier_share": a.tier_share, "tier_rank": a.tier_rank,
                      "input_metric": a.input_metric, "input_metric_batches": a.input_metric_batches,
                      "seed": a.seed,
                      **extra}
            if method == "see":
                params["b_share"] = a.b_share
                params["order"] = a.order
                if a.max_rank:
                    params["max_rank"] = a.max_rank
                if a.fill_rank:
                    params["fill_rank"] = True
                if a.no_balance_units:
                    params["balance_units"] = False
                if a.reassign_rounds is not None:
                    params["reassign_rounds"] = a.reassign_rounds
                if a.knowledge_role:
                    params["knowledge_role"] = a.knowledge_role
                if a.basis_dim and extra.get("basis") == "principal":
                    params["basis_dim"] = a.basis_dim
            cfg = parse_params(get_method(method), params)
            calib = Calibration(cal, seq_len=a.seq_len, max_samples=a.samples, batch_size=a.batch_size)
            if name == DENSE_ADAPTED:
                row = dense_adapted(loaded, cfg, calib, task, ev, opts, dense, ratio)
            else:
                row = compressed(loaded, name, method, cfg, calib, task, ev, opts, dense, ratio)
            if val is not None:
                qv = evaluate(loaded, task, val, opts=opts)
                row.update(validation=qv.value, validation_x_dense=qv.value / dense_val.value)
                print(f"ratio {ratio:g} {name}: validation {qv.value:.4f} "
                      f"({row['validation_x_dense']:.3f}x dense)", flush=True)
            rows.append(row)
            print(f"ratio {ratio:g} {name}: {dense.metric} {row['quality']:.4f} "
                  f"({row['x_dense']:.3f}x dense), {row['embedding_params']:,} params "
                  f"({row['achieved_ratio']:.1f}x), row error {row.get('row_error', 0.0):.3f}, "
                  f"{row['stage2_steps']} stage-2 steps, {row['seconds']:.0f}s", flush=True)
            if a.json:       # after every row, so a later failure keeps the rows measured so far
                fsutil.write_json(a.json, {"model": a.model, "metric": dense.metric, "args": vars(a),
                                           "rows": rows})
    vhead = "validation | x dense | " if val is not None else ""
    lines = [f"| ratio | method | {vhead}{dense.metric} | x dense | embedding params | achieved ratio | "
             "row rel. error after stage 1a | WordNet coverage | seconds |",
             "|" + "---|" * (11 if val is not None else 9)]
    for r in rows:
        cov = f"{r['coverage']:.1%}" if r.get("coverage") is not None else ""
        vcol = f"{r['validation']:.4f} | {r['validation_x_dense']:.3f} | " if val is not None else ""
        lines.append(f"| {r['ratio']:g} | {r['method']} | {vcol}{r['quality']:.4f} | {r['x_dense']:.3f} | "
                     f"{r['embedding_params']:,} | {r.get('achieved_ratio', 1.0):.1f} | "
                     f"{r.get('row_error', 0.0):.3f} | {cov} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.markdown:
        fsutil.write_text(a.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
