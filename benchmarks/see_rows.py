"""SEE stage 1a alone (row reconstruction) under different unit-table splits and row weights, with
the truncated SVD at the same ratio for reference (a measurement, not a test; docs/see.md).

    .venv/bin/python benchmarks/see_rows.py --ratio 10 --steps 500 \
        --variants 0.5:0,0.2:0,0.8:0,0.5:3,0.5:30

A variant is B_SHARE:FREQUENCY_WEIGHT[:MAX_RANK[:fill]] (compress/see.py SEEConfig.b_share /
frequency_weight / max_rank / fill_rank; the weights come from the calibration split). With
`--basis principal` the fit is taken in see's default principal basis (its d' x d matrix counted
in the budget), and the errors are measured on the table itself. Two errors per fit: the plain relative error over the
whole vocabulary, and the per-row relative error averaged with the token counts of the
*evaluation* split, i.e. how well the rows a held-out text uses are rebuilt.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pocketformer.compress import Calibration
from pocketformer.compress.see import (SEEConfig, fit_rows, init_entangled, plan_units, row_weights,
                                       split_coordinates, weighted_svd, with_basis)
from pocketformer.data import DataSpec, load_for
from pocketformer.models import load_model

STS = "../shared/data/stsbenchmark/sts-dev.csv"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=500, help="Adam steps after the ALS sweeps")
    p.add_argument("--variants", default="0.5:0,0.5:3")
    p.add_argument("--calibration", default=f"{STS}@0:0.5")
    p.add_argument("--evaluation", default=f"{STS}@0.5:1")
    p.add_argument("--svd-weights", default="0,1,10")
    p.add_argument("--basis", default="raw", choices=["raw", "principal"])
    p.add_argument("--order", type=int, default=2, choices=[2, 3], help="Kronecker factors per term")
    a = p.parse_args()

    loaded = load_model(a.model)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    V, d = E.shape

    def batches(spec):
        data = load_for(loaded.adapter.data_kind, DataSpec.parse(spec))
        return Calibration(data, seq_len=128, max_samples=1500, batch_size=32).inputs(loaded)

    cal = batches(a.calibration)
    n_eval = row_weights(batches(a.evaluation), V, 1.0) - 1       # proportional to eval counts
    n_cal = row_weights(cal, V, 1.0) - 1
    print(f"distinct tokens: calibration {int((n_cal > 0).sum())}, evaluation {int((n_eval > 0).sum())}; "
          f"share of evaluation tokens never in calibration {float(n_eval[n_cal == 0].sum() / n_eval.sum()):.3f}")

    def eval_weighted(W):
        err = ((W - E) ** 2).sum(-1) / (E ** 2).sum(-1)
        return float((n_eval * err).sum() / n_eval.sum())

    tokens = loaded.adapter.vocabulary(loaded)
    for variant in a.variants.split(","):
        fields = variant.split(":")
        b_share, beta = float(fields[0]), float(fields[1])
        cfg = SEEConfig(ratio=a.ratio, b_share=b_share, basis=a.basis, order=a.order,
                        max_rank=int(fields[2]) if len(fields) > 2 else None,
                        fill_rank=len(fields) > 3 and fields[3] == "fill")
        start = time.time()
        P, X, dims = split_coordinates(E, cfg)
        plan = plan_units(tokens, loaded.family, X, dims, cfg, width=d,
                          reserved=0 if P is None else P.numel())
        core = init_entangled(plan, dims, X, 0)
        fit_rows(core, X, a.steps, cfg.lr, 0, plan.active, weights=row_weights(cal, V, beta))
        emb = core if P is None else with_basis(core, P)
        with torch.no_grad():
            W = emb.weight
            err = float(((W - E) ** 2).sum() / (E ** 2).sum())
            ev = eval_weighted(W)
        print(f"see {a.basis} order {a.order} ({' x '.join(map(str, dims))}) {variant}: "
              f"U_a {plan.units_a} U_b {plan.units_b}"
              + (f" U_c {plan.units_c}" if plan.index_c is not None else "") + f" rank {cfg.rank()} "
              f"mean rank {plan.stats['mean_rank']:.2f} hypernym depth {plan.stats['hypernym_depth']} "
              f"params {emb.param_count():,} | "
              f"row error {err:.3f}, eval-weighted {ev:.3f} ({time.time() - start:.0f} s)",
              flush=True)
    k = int(V * d / a.ratio / (V + d))
    for beta in [float(b) for b in a.svd_weights.split(",")]:
        P, Q = weighted_svd(E, k, row_weights(cal, V, beta))
        Ek = P @ Q
        print(f"svd k {k} frequency_weight {beta:g}: row error "
              f"{float(((Ek - E) ** 2).sum() / (E ** 2).sum()):.3f}, eval-weighted {eval_weighted(Ek):.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
