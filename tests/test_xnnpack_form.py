"""The forward programs' XNNPACK form (models/xnnpack_form.py): inside the context the model
computes what it computes outside (norms as linear products, attention as 3-D bmm under the
additive mask), every family's norms are swapped, and on exit the module and its config are the
user's again. The programs it gives: tests/test_export_tiny.py (the delegation gate names only
the mask ops) and tests/test_minilm_build.py (the real MiniLM's .pte: 4 partitions, parity)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketformer.models import load_model
from pocketformer.models.xnnpack_form import ATTENTION, attention, is_rms_norm, xnnpack_form


def _norms(module):
    return [m for m in module.modules() if isinstance(m, nn.LayerNorm) or is_rms_norm(m)]


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_llama_2l", "tiny_qwen2", "tiny_vit_config"])
def test_same_outputs_inside_the_form_and_the_model_restored_after(family, request):
    loaded = load_model(request.getfixturevalue(family))
    module = loaded.adapter.export_module(loaded)
    inputs = loaded.adapter.example_inputs(loaded, batch=2, seq_len=24)
    before = {n: id(m) for n, m in module.named_modules()}
    impl = loaded.model.config._attn_implementation
    norms = _norms(module)
    with torch.inference_mode():
        ref = module(*inputs)
        with xnnpack_form(module) as form:
            assert form["norms_by_linear"] == len(norms) > 0
            assert form["attention"] == "bmm with additive mask"
            assert not _norms(module)                                  # every norm swapped
            assert loaded.model.config._attn_implementation == ATTENTION
            got = module(*inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert {n: id(m) for n, m in module.named_modules()} == before
    assert loaded.model.config._attn_implementation == impl
    torch.testing.assert_close(module(*inputs), ref)


def test_grouped_query_attention_matches_repeated_kv_heads():
    """Two KV heads for six query heads, with a padded key and a causal mask: the stacked-rows
    form equals softmax(q k^T / sqrt(d) + mask) v with each KV head repeated for its group."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, 5, 8
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    mask = torch.zeros(B, 1, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9)
    mask[1, :, :, 0] = -1e9
    out, _ = attention(nn.Module().eval(), q, k, v, mask, scaling=0.3)
    kr, vr = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
    ref = torch.softmax(q @ kr.transpose(-1, -2) * 0.3 + mask, dim=-1) @ vr
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_norm_swaps_are_undone_when_the_block_raises(tiny_bert):
    loaded = load_model(tiny_bert)
    module = loaded.adapter.export_module(loaded)
    n = len(_norms(module))
    with pytest.raises(RuntimeError, match="inside"):
        with xnnpack_form(module):
            raise RuntimeError("inside")
    assert len(_norms(module)) == n and loaded.model.config._attn_implementation != ATTENTION
