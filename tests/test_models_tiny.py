"""Adapters on tiny random-weight configs of each family: structure, drop-layers, reload."""
from __future__ import annotations

import json

import pytest
import torch

from pocketformer.cli import main
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.data import DataSpec, load_for
from pocketformer.errors import BadInputError
from pocketformer.models import load_model, save_model


def test_llama_adapter_knows_gqa_and_tied_head(tiny_llama):
    loaded = load_model(tiny_llama)
    info = loaded.adapter.describe(loaded.model)
    assert info["family"] == "llama" and info["num_layers"] == 6
    assert info["attention_heads"] == [4] * 6 and info["kv_heads"] == [2] * 6
    assert info["head_dim"] == 16 and info["ffn_widths"] == [128] * 6
    assert info["tied_lm_head"] is True
    spec = loaded.adapter.attention(loaded.adapter.layers(loaded.model)[0], loaded.config)
    assert spec.group_size == 2


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_drop_layers_reloads_with_plain_transformers(fixture, request, tmp_path, small_text):
    from transformers import AutoModelForCausalLM

    src = request.getfixturevalue(fixture)
    loaded = load_model(src)
    module = loaded.adapter.export_module(loaded)
    ids = loaded.adapter.example_inputs(loaded, seq_len=16)
    calib = Calibration(load_for("text", DataSpec.parse(small_text)), seq_len=32, max_samples=8)
    method = get_method("drop-layers")
    rec = run_step(loaded, "drop-layers", parse_params(method, {"remove_layers": 2}), calib)
    assert len(rec["details"]["removed"]) == 2 and len(rec["details"]["scores"]) == 6
    assert rec["params_after"] < rec["params_before"]
    with torch.inference_mode():
        expected = module(*ids)
    save_model(loaded, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert plain.config.num_hidden_layers == 4
    assert [l.self_attn.layer_idx for l in plain.model.layers] == [0, 1, 2, 3]
    with torch.inference_mode():
        got = plain(input_ids=ids[0]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Generation with a KV cache works after re-indexing (each kept layer has its own slot).
    out = plain.generate(ids[0][:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    meta = json.loads((tmp_path / "m" / "pocketformer.json").read_text())
    assert meta["history"][0]["method"] == "drop-layers"


def test_bert_and_vit_drop_layers(tiny_bert, tiny_vit_config, tmp_path):
    from transformers import AutoModel

    for src, n in ((tiny_bert, 4), (tiny_vit_config, 4)):
        loaded = load_model(src)
        method = get_method("drop-layers")
        run_step(loaded, "drop-layers", parse_params(method, {"layers": [1, 2]}), None)
        assert len(loaded.adapter.layers(loaded.model)) == n - 2
        assert loaded.config.num_hidden_layers == n - 2
        out = loaded.adapter.export_module(loaded)(*loaded.adapter.example_inputs(loaded, batch=2))
        assert out.shape[0] == 2 and torch.isfinite(out).all()
    save_model(loaded, tmp_path / "vit")
    again = load_model(tmp_path / "vit")
    assert again.family == "vit" and again.config.num_hidden_layers == 2
    bert = load_model(tiny_bert)
    run_step(bert, "drop-layers", parse_params(get_method("drop-layers"), {"remove_layers": 1,
                                                                           "criterion": "last"}), None)
    save_model(bert, tmp_path / "bert")
    assert AutoModel.from_pretrained(tmp_path / "bert").config.num_hidden_layers == 3


def test_drop_layers_bad_input(tiny_llama, tmp_path, capsys):
    loaded = load_model(tiny_llama)
    method = get_method("drop-layers")
    with pytest.raises(BadInputError, match="has 6"):
        run_step(loaded, "drop-layers", parse_params(method, {"remove_layers": 6, "criterion": "last"}), None)
    with pytest.raises(BadInputError, match="out of range"):
        run_step(loaded, "drop-layers", parse_params(method, {"layers": [0, 9]}), None)
    with pytest.raises(BadInputError, match="exactly one"):
        parse_params(method, {"layers": [0], "remove_layers": 1})
    # CLI: more layers than exist -> exit 2; block influence without data -> exit 2
    assert main(["compress", "--model", str(tiny_llama), "--method", "drop-layers",
                 "--remove-layers", "7", "--criterion", "last", "--out", str(tmp_path / "o")]) == 2
    assert "the model has 6" in capsys.readouterr().err
    assert main(["compress", "--model", str(tiny_llama), "--method", "drop-layers",
                 "--remove-layers", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compress_cli_writes_loadable_dir(tiny_llama, small_text, tmp_path, capsys):
    code = main(["compress", "--model", str(tiny_llama), "--method", "drop-layers",
                 "--remove-layers", "3", "--calibration", str(small_text), "--seq-len", "32",
                 "--samples", "4", "--out", str(tmp_path / "o")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [6, 3]
    assert load_model(tmp_path / "o").config.num_hidden_layers == 3
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_vit_accuracy_on_digits_pipeline_shapes(tiny_vit_config, digits_npz):
    from pocketformer.evaluation import evaluate

    loaded = load_model(tiny_vit_config)
    data = load_for("images", DataSpec.parse(f"{digits_npz}@0:0.2"))
    result = evaluate(loaded, "accuracy", data)
    assert result.metric == "accuracy" and 0.0 <= result.value <= 1.0
    assert result.samples == len(data.labels)
