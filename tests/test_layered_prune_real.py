"""layered-prune on the real pre-trained models, with quality assertions on held-out data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocketformer.cli import main
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, evaluate
from pocketformer.models import load_model

from conftest import REPO, STS_DEV, WIKITEXT

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "pocketformer")


def test_smollm2_personalized_two_layers(tmp_path):
    """Criterion only, no recovery: 2 of 30 layers chosen on 8 random 128-token windows of the
    first half of WikiText-2 validation; perplexity on 8 held-out 256-token windows of the second
    half (personalized removes layers 5 and 14 here). Any 2 removed layers cost SmolLM2 about a
    quarter in perplexity here (measured: ShortGPT 43.726, personalized 43.734, dense 34.499), so
    the assertion is against ShortGPT run on the same data, plus a ceiling against dense."""
    out = tmp_path / "pruned"
    code = main(["compress", "--model", "smollm2", "--method", "layered-prune", "--remove-layers", "2",
                 "--criterion", "personalized", "--calibration", f"{WIKITEXT}@0:0.5", "--seq-len", "128",
                 "--samples", "8", "--bootstrap", "200", "--out", str(out)])
    assert code == 0
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 28
    step = json.loads((out / "pocketformer.json").read_text())["history"][0]["details"]
    sel = step["steps"][0]["selection"]
    assert sel["details"]["classes"].count("common") == 2 and 0 not in step["removed"]
    ev = load_for("text", DataSpec.parse(f"{WIKITEXT}@0.5:1"))
    opts = EvalOptions(seq_len=256, max_windows=8)
    dense_model = load_model("smollm2")
    dense = evaluate(dense_model, "ppl", ev, opts=opts).value
    pruned = evaluate(load_model(out), "ppl", ev, opts=opts).value
    cal = load_for("text", DataSpec.parse(f"{WIKITEXT}@0:0.5"))
    cfg = parse_params(get_method("drop-layers"), {"remove_layers": 2, "criterion": "shortgpt"})
    run_step(dense_model, "drop-layers", cfg, Calibration(cal, seq_len=128, max_samples=8, batch_size=4))
    shortgpt = evaluate(dense_model, "ppl", ev, opts=opts).value
    assert pruned <= 1.35 * dense, (pruned, dense)
    assert pruned <= 1.03 * shortgpt, (pruned, shortgpt)


def test_minilm_two_layers_with_recovery(tmp_path, dense_minilm_sts):
    """2 of 6 layers removed, distillation on the calibration half of STS dev capped at one pass
    over its 24 batches in all (12 steps after each of the 2 steps; the 10 minutes are never
    reached), so the quality does not depend on the machine or a neighbour on its cores.
    Measured 0.9936x dense at one pass, 0.9867x at two (one thread, beside another job)."""
    loaded = load_model("minilm")
    ev = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0.5:1"))
    dense = dense_minilm_sts
    cal = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0:0.5"))
    cfg = parse_params(get_method("layered-prune"), {
        "remove_layers": 2, "steps": 2, "recovery": "distill", "recovery_minutes": 10.0,
        "recovery_max_passes": 1.0, "lr": 1e-4, "bootstrap": 200})
    rec = run_step(loaded, "layered-prune", cfg,
                   Calibration(cal, seq_len=128, max_samples=750, batch_size=32))
    pruned = evaluate(loaded, "sts", ev).value
    assert len(loaded.adapter.layers(loaded.model)) == 4
    assert [s["recovery"]["steps"] for s in rec["details"]["steps"]] == [12, 12]
    assert all(s["recovery"]["stopped_by"] == "passes" for s in rec["details"]["steps"])
    assert pruned >= 0.97 * dense, (pruned, dense)


@pytest.fixture(scope="module")
def vit_digits(tmp_path_factory):
    """The project's own small ViT, trained on scikit-learn's digits (examples/vit_digits.py)."""
    sys.path.insert(0, str(REPO / "examples"))
    import vit_digits as vd

    out = tmp_path_factory.mktemp("vit")
    info = vd.train(out)
    assert info["evaluation_accuracy"] >= 0.93
    return out


def test_vit_quarter_of_params_removed_within_one_point(vit_digits, tmp_path):
    from pocketformer.models import count_params

    ev = load_for("images", DataSpec.parse(vit_digits / "evaluation.npz"))
    cal = load_for("images", DataSpec.parse(vit_digits / "calibration.npz"))
    dense_model = load_model(vit_digits / "model")
    dense = evaluate(dense_model, "accuracy", ev).value
    loaded = load_model(vit_digits / "model")
    cfg = parse_params(get_method("layered-prune"), {
        "remove_layers": 1, "params_fraction": 0.26, "width_multiple": 16, "recovery": "lsq",
        "bootstrap": 200})
    run_step(loaded, "layered-prune", cfg, Calibration(cal, max_samples=300, batch_size=32))
    removed = 1 - count_params(loaded.model) / count_params(dense_model.model)
    assert removed >= 0.25
    pruned = evaluate(loaded, "accuracy", ev).value
    assert dense - pruned <= 0.01, (dense, pruned)
    # heterogeneous FFN widths: saved with per-layer shapes and reloaded by pocketformer
    from pocketformer.models import save_model
    save_model(loaded, tmp_path / "vit")
    again = load_model(tmp_path / "vit")
    assert evaluate(again, "accuracy", ev).value == pytest.approx(pruned)
