"""Residual-stream rotation before 8da4w rounding (export/rotate.py): the Hadamard constructions,
that the rotated network computes the same function (tiny llama/qwen2 with per-layer widths and
non-trivial norm gains, and the real SmolLM2), that it removes the activation outliers int8
per-token quantization suffers from on real text, the export wiring and the refusals."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from pocketformer.cli import main
from pocketformer.data import DataSpec, load_for
from pocketformer.errors import BadInputError
from pocketformer.export import ExportConfig, export_model
from pocketformer.export.exporters import _calibrated_rounding, export_generation
from pocketformer.export.quantize import quantize_for_executorch
from pocketformer.export.rotate import hadamard, rotatable, rotate_model, rotation_matrix, smooth_ffn
from pocketformer.models import load_model

from conftest import WIKITEXT


@pytest.mark.parametrize("n", [1, 2, 12, 24, 64, 144, 576, 1536])
def test_hadamard_orders_are_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert h is not None
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


def test_orders_without_a_construction_fall_back_to_a_random_orthogonal_matrix():
    assert hadamard(36) is None and hadamard(10) is None
    q, kind = rotation_matrix(36, torch.Generator().manual_seed(0))
    assert kind == "random-orthogonal"
    assert torch.allclose(q @ q.T, torch.eye(36, dtype=torch.float64), atol=1e-10)
    q2, _ = rotation_matrix(36, torch.Generator().manual_seed(0))
    assert torch.equal(q, q2)           # seeded


def _with_gains(loaded, seed=0):
    """Random positive norm gains with one large channel, as trained LLMs have."""
    g = torch.Generator().manual_seed(seed)
    norms = [n for layer in loaded.adapter.layers(loaded.model) for n in loaded.adapter.norms(layer)]
    for n in norms + [loaded.adapter.final_norm(loaded.model)]:
        w = torch.rand(n.weight.shape, generator=g) + 0.5
        w[3] = 8.0
        n.weight.data.copy_(w)
    return loaded


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_rotated_model_computes_the_same_logits(family, request):
    loaded = _with_gains(load_model(request.getfixturevalue(family)))
    if family == "tiny_qwen2":      # q/k/v biases: the readers' biases stay, v's is rotated
        for layer in loaded.adapter.layers(loaded.model):
            assert layer.self_attn.v_proj.bias is not None
    x = loaded.adapter.example_inputs(loaded, batch=2, seq_len=24)
    with torch.no_grad():
        ref = loaded.adapter.export_module(loaded)(*x)
    rotated, report = rotate_model(loaded, check_inputs=x)
    with torch.no_grad():
        got = rotated.adapter.export_module(rotated)(*x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())
    assert report.max_logit_diff < 1e-4
    m = rotated.model
    emb, head = rotated.adapter.embeddings(m), rotated.adapter.output_head(m)
    assert head.weight is not emb.weight and getattr(head, "pf_untied", False)
    assert all(bool((n.weight == 1).all()) for layer in rotated.adapter.layers(m)
               for n in rotated.adapter.norms(layer))
    # the original is untouched, the weights did change
    assert loaded.adapter.output_head(loaded.model).weight is loaded.adapter.embeddings(loaded.model).weight
    assert not torch.allclose(emb.weight, loaded.adapter.embeddings(loaded.model).weight)


def test_rotation_of_a_model_with_per_layer_widths(tiny_llama):
    loaded = load_model(tiny_llama)
    adapter = loaded.adapter
    layers = adapter.layers(loaded.model)
    adapter.keep_kv_heads(layers[1], loaded.config, [1])          # 1 of 2 KV groups
    adapter.keep_ffn_channels(layers[2], list(range(0, 128, 2)))  # 64 of 128 channels
    info = adapter.describe(loaded.model)
    assert info["kv_heads"][1] == 1 and info["ffn_widths"][2] == 64
    _with_gains(loaded)
    x = adapter.example_inputs(loaded, batch=1, seq_len=16)
    _, report = rotate_model(loaded, check_inputs=x)
    assert report.max_logit_diff < 1e-4


def test_rotation_refuses_layernorm_models_with_exit_2(tiny_bert, tmp_path, capsys):
    loaded = load_model(tiny_bert)
    assert "LayerNorm" in rotatable(loaded)
    code = main(["export", str(tiny_bert), "--format", "pte", "--quantize", "8da4w",
                 "--rotation", "on", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "rotation" in err and "LayerNorm" in err
    for bad in ({"quantize": "fp32", "rotation": "on"}, {"quantize": "8da4w", "rotation": "yes"},
                {"quantize": "int8", "smoothing": 1.5}):
        with pytest.raises(BadInputError) as e:
            ExportConfig(formats=["pte"], **bad).validate()
        assert e.value.field in ("rotation", "smoothing")


def test_8da4w_generation_program_is_rotated_and_rounded(tiny_llama_1l, small_text, tmp_path):
    """The KV-cache program is made from the rotated, GPTQ-rounded model and decodes like it;
    the value projections kept at 8 bits are left out of GPTQ and written as int8.
    (The forward program's plan: tests/test_export_tiny.py.)"""
    loaded = _with_gains(load_model(tiny_llama_1l))
    cfg = ExportConfig(formats=["pte"], quantize="8da4w", calibration=str(small_text),
                       calibration_samples=8, calibration_seq_len=32, seq_len=16, max_len=32,
                       greedy_tokens=8, min_delegated_flops=None, etrecord=False,
                       int8_linears=["v_proj"])
    module = loaded.adapter.export_module(loaded)
    work, group, rounding, rotation = _calibrated_rounding(loaded, module, cfg)
    assert rotation["residual"] == "randomized-hadamard" and rounding["method"] == "gptq"
    rec = export_generation(work, tmp_path, "pte", cfg, stem="model-8da4w", extra={},
                            group_size=group, rounding=rounding, rotation=rotation)
    q = rec.details["quantization"]
    assert q["rotation"]["value_heads"] == "randomized-hadamard" and q["rounding"] == "gptq"
    assert q["lm_head"].startswith("untied")
    # 1 layer x 7 linears + the head, of which the value projection is int8, not GPTQ'd
    assert [n.rsplit(".", 3)[1:] for n in q["int8_linears"]] == [["0", "self_attn", "v_proj"]]
    assert q["quantized"] == 8 and rounding["rounded"] == q["calibrated"] == 7
    side = json.loads((tmp_path / f"{rec.path}.json").read_text())
    assert side["details"]["quantization"]["rotation"]["seed"] == 0
    assert rec.parity["greedy_match_prefix"] >= 4, rec.parity
    # off, or round-to-nearest under auto: the model is not rotated
    for rotation, rounding in (("off", "gptq"), ("auto", "rtn")):
        cfg2 = dataclasses.replace(cfg, rotation=rotation, rounding=rounding)
        _, _, report, rot = _calibrated_rounding(loaded, module, cfg2)
        assert rot is None and (report is None) == (rounding == "rtn")


def _per_token_int8_error(x: torch.Tensor) -> float:
    """Relative error of XNNPACK's dynamic activation quantization (asymmetric int8 per token)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp_min(1e-12)
    zp = torch.round(-128 - lo / s)
    xq = (torch.clamp(torch.round(x / s) + zp, -128, 127) - zp) * s
    return float((xq - x).norm() / x.norm())


def _input_errors(loaded, ids) -> dict[str, float]:
    errs: dict[str, list[float]] = {}
    hooks = []
    for name, m in loaded.model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "gate_proj", "o_proj"):
            kind = name.rsplit(".", 1)[-1]
            hooks.append(m.register_forward_pre_hook(
                lambda mod, a, kind=kind: errs.setdefault(kind, []).append(_per_token_int8_error(a[0]))))
    with torch.no_grad():
        logits = loaded.adapter.export_module(loaded)(ids)
    for h in hooks:
        h.remove()
    return {k: sum(v) / len(v) for k, v in errs.items()}, logits


def test_int8_onnx_is_rotated_and_smoothed_with_calibration(tiny_llama_2l, small_text, tmp_path):
    loaded = _with_gains(load_model(tiny_llama_2l))
    cfg = ExportConfig(formats=["onnx"], quantize="int8", calibration=str(small_text),
                       calibration_samples=8, calibration_seq_len=32, seq_len=16, generation=False)
    (rec,) = export_model(loaded, tmp_path / "cal", cfg)
    q = rec.details["quantization"]
    assert q["rotation"]["residual"] == "randomized-hadamard"
    sm = q["smoothing"]
    assert sm["alpha"] == 0.5 and sm["layers"] == 2 and sm["max_input_after"] < sm["max_input_before"]
    assert rec.parity["passed"] and rec.parity["cosine_vs_fp32"] > 0.99, rec.parity
    # without calibration data nothing is changed (and nothing is recorded)
    (plain,) = export_model(loaded, tmp_path / "plain", dataclasses.replace(cfg, calibration=None))
    assert "rotation" not in plain.details["quantization"]
    assert "smoothing" not in plain.details["quantization"]


def test_smoothing_keeps_the_function(tiny_llama, small_text):
    loaded = _with_gains(load_model(tiny_llama))
    data = load_for("text", DataSpec.parse(str(small_text)))
    batches = loaded.adapter.calibration_inputs(loaded, data, max_samples=8, seq_len=32, batch_size=4)
    smoothed, report = smooth_ffn(loaded, batches, alpha=0.5)
    x = loaded.adapter.example_inputs(loaded, batch=2, seq_len=20)
    with torch.no_grad():
        a = loaded.adapter.export_module(loaded)(*x)
        b = smoothed.adapter.export_module(smoothed)(*x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert report.layers == 6 and report.samples == 8


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2")
    rotated, _ = rotate_model(loaded)
    return loaded, rotated


def test_real_smollm2_rotation_keeps_logits_and_removes_activation_outliers(smollm2):
    loaded, rotated = smollm2
    text = load_for("text", DataSpec.parse(f"{WIKITEXT}@0.5:0.52"))
    ids = loaded.adapter.token_ids(loaded, text.text)[:256].view(2, 128)
    before, ref = _input_errors(loaded, ids)
    after, got = _input_errors(rotated, ids)
    # same function: logits agree and so does the next-token choice
    assert float((got - ref).abs().max()) < 2e-3 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.99
    # int8 per-token quantization of the linears' inputs on real text: the stream inputs
    # (q, gate) lose most of their outlier error (measured 0.025 -> 0.0064, 0.017 -> 0.0064),
    # the value-head outputs (o) some of it (0.0125 -> 0.0097)
    for kind, factor in (("q_proj", 0.5), ("gate_proj", 0.5), ("o_proj", 0.9)):
        assert after[kind] < factor * before[kind], (kind, before, after)




def _ort_int8_perplexity(loaded, data) -> float:
    """Perplexity with every linear as ONNX Runtime's int8 dynamic quantization computes it:
    int8 symmetric weights per output channel, uint8 activations with one scale per tensor."""
    from pocketformer.evaluation import EvalOptions, evaluate

    def w8(w):
        s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return torch.clamp(torch.round(w / s), -127, 127) * s

    def a8(x):
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        s = max((hi - lo) / 255, 1e-12)
        zp = round(-lo / s)
        return (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp) * s

    module = loaded.adapter.export_module(loaded)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    saved = [m.weight.data for m in linears]
    hooks = [m.register_forward_pre_hook(lambda mod, a: (a8(a[0]),)) for m in linears]
    try:
        for m in linears:
            m.weight.data = w8(m.weight.data)
        with torch.no_grad():
            return evaluate(loaded, "ppl", data, fn=module, opts=EvalOptions(seq_len=128, max_windows=6)).value
    finally:
        for h in hooks:
            h.remove()
        for m, w in zip(linears, saved):
            m.weight.data = w


def test_real_smollm2_rotation_and_smoothing_make_per_tensor_int8_usable(smollm2):
    """The int8 ONNX path on the real model: held-out perplexity under ONNX Runtime's
    per-tensor activation quantization, plain vs rotated + smoothed (calibrated on another split).
    The shipped file's figure is measured by benchmarks/export_table.py (docs/export.md)."""
    from pocketformer.evaluation import EvalOptions, evaluate

    loaded, rotated = smollm2
    ev = load_for("text", DataSpec.parse(f"{WIKITEXT}@0.5:1"))
    cal = load_for("text", DataSpec.parse(f"{WIKITEXT}@0:0.5"))
    batches = rotated.adapter.calibration_inputs(rotated, cal, max_samples=8, seq_len=256, batch_size=8)
    smoothed, report = smooth_ffn(rotated, batches, alpha=0.5)
    assert report.max_input_after < 0.1 * report.max_input_before
    fp32 = evaluate(loaded, "ppl", ev, opts=EvalOptions(seq_len=128, max_windows=6)).value
    plain = _ort_int8_perplexity(loaded, ev)
    prepared = _ort_int8_perplexity(smoothed, ev)
    assert plain > 1.3 * fp32, (plain, fp32)           # the problem is real on this model
    assert prepared < 1.08 * fp32, (prepared, plain, fp32)


def test_real_smollm2_value_projections_at_int8_recover_most_of_4bit_rounding(smollm2):
    """`--int8-linears v_proj` on the real model: the rotated SmolLM2 quantized for ExecuTorch
    (8da4w group 192 by rounding to nearest, int8 head), held-out perplexity of the torchao
    module the .pte is lowered from, with the 30 value projections (3% of the layers' weights)
    at 4 or 8 bits. Measured 113.9 -> 64.9 (fp32 37.5); with GPTQ the gap is smaller
    (docs/export.md, "Linears kept at 8 bits")."""
    from pocketformer.evaluation import EvalOptions, evaluate

    loaded, rotated = smollm2
    ev = load_for("text", DataSpec.parse(f"{WIKITEXT}@0.5:1"))
    opts = EvalOptions(seq_len=128, max_windows=6)
    fp32 = evaluate(loaded, "ppl", ev, opts=opts).value
    module = rotated.adapter.export_module(rotated)
    ppl = {}
    for keep in ((), ("v_proj",)):
        q, plan = quantize_for_executorch(module, "8da4w", 192, lm_head="int8", int8_linears=keep)
        assert len(plan.int8_linears) == (30 if keep else 0) and not plan.skipped
        ppl[keep] = evaluate(rotated, "ppl", ev, fn=q, opts=opts).value
    assert fp32 < ppl[("v_proj",)] < 0.8 * ppl[()], (fp32, ppl)
