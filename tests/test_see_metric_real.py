"""The input metric on the real all-MiniLM-L6-v2: measured on the user's calibration sentences, it
makes the same 40x truncated SVD of the embedding score better on held-out STS pairs, with no
training at all (deterministic: no wall-clock budget, so not a serial test)."""
from __future__ import annotations

import torch

from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.compress.see import input_moment
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import evaluate
from pocketformer.models import load_model

from conftest import STS_DEV


def test_input_metric_lifts_an_untrained_40x_svd_on_held_out_pairs(dense_minilm_sts):
    ev = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0.5:1"))
    cal = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0:0.5"))
    dense = dense_minilm_sts
    scores = {}
    for beta in (0.0, 0.5):
        loaded = load_model("minilm")
        cfg = parse_params(get_method("embed-svd"), {"ratio": 40, "input_metric": beta,
                                                     "hidden_minutes": 0, "distill_minutes": 0})
        run_step(loaded, "embed-svd", cfg, Calibration(cal, seq_len=128, max_samples=512, batch_size=32))
        scores[beta] = evaluate(loaded, "sts", ev).value
    # measured: 0.6385 (0.797x dense) plain, 0.6898 (0.861x) in the metric (docs/see.md)
    assert scores[0.5] >= scores[0.0] + 0.03, scores
    assert scores[0.5] >= 0.83 * dense, (scores, dense)


def test_input_moment_on_minilm_sees_no_all_ones_direction_and_is_anisotropic():
    """The embedding LayerNorm removes each input vector's mean, so the output cannot move along
    the all-ones direction: C has (numerically) nothing there. And a few directions carry most of
    what the model reads (docs/see.md: 64 of 384 hold about half of the trace)."""
    loaded = load_model("minilm")
    cal = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0:0.5"))
    batches = Calibration(cal, seq_len=128, max_samples=128, batch_size=32).inputs(loaded)
    C = input_moment(loaded, batches, seed=0).double()
    d = C.shape[0]
    ones = torch.ones(d, dtype=torch.float64) / d ** 0.5
    assert float(ones @ C @ ones) < 1e-6 * float(torch.trace(C)) / d
    lam = torch.linalg.eigvalsh(C).flip(0)
    assert float(lam[:64].sum() / lam.sum()) > 0.4          # 64 / 384 = 0.17 if isotropic
