"""The real SmolLM2-135M: drop 14 of its 30 layers (the real weights, GQA, tied head and RoPE
are what this file checks; the export's tracing time grows with depth, so the model is kept
short), reload with plain transformers, ONNX parity on logits,
and the pruned model's ONNX generation graph decodes the same 32 greedy tokens as eager
`transformers` (the suite's real-model generation check; .pte generation is checked on the tiny
decoders, test_export_tiny.py and test_native_generate.py). (Perplexity of a 2-of-30 pruned SmolLM2 on held-out text: tests/test_layered_prune_real.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketformer.cli import main

from conftest import WIKITEXT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "pruned"
    code = main(["compress", "--model", "smollm2", "--method", "drop-layers", "--remove-layers", "14",
                 "--calibration", f"{WIKITEXT}@0:0.5", "--seq-len", "128", "--samples", "16",
                 "--out", str(out)])
    assert code == 0
    return out


def test_reloads_with_plain_transformers(pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert model.config.num_hidden_layers == 16
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    meta = json.loads((pruned / "pocketformer.json").read_text())
    step = meta["history"][0]
    assert step["details"]["layers_before"] == 30 and len(step["details"]["removed"]) == 14
    # ShortGPT's observation holds on this model: the first layer is never the one to drop.
    assert 0 not in step["details"]["removed"]


def test_onnx_logits_parity(pruned, tmp_path):
    out = tmp_path / "art"
    code = main(["export", str(pruned), "--format", "onnx", "--seq-len", "64", "--out", str(out)])
    assert code == 0
    side = json.loads((out / "model.onnx.json").read_text())
    assert side["parity"]["passed"] and side["parity"]["cosine"] >= 0.99999
    assert side["parity"]["max_abs_diff"] < 1e-3
    assert side["inputs"][0]["name"] == "input_ids" and side["outputs"] == ["logits"]
    gen = json.loads((out / "model-gen.onnx.json").read_text())
    p = gen["parity"]
    assert p["greedy_tokens"] == 32 and p["greedy_match_prefix"] == 32 and p["passed"], p
    tokens = gen["details"]["generation"]["tokens"]
    assert tokens == gen["details"]["generation"]["eager_tokens"] and len(set(tokens)) > 3
