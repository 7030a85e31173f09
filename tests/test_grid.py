"""Grid rounding (export/grid.py): weights on an asymmetric 4-bit block grid plus a low-rank term
are exported exactly as a symmetric 4-bit linear, a block-sum term and the low-rank term."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.export.exporters import ExportConfig, _calibrated_rounding, export_generation
from pocketformer.export.grid import asymmetric_blocks, dequantize_blocks, grid_model
from pocketformer.export.quantize import quantize_for_executorch
from pocketformer.models import load_model, save_model


def _on_grid_with_lowrank(loaded, rank=2, seed=0):
    """Put every layer linear on a Q4_1 grid (blocks of 32) and add a rank-`rank` term, as a
    low-rank recovery of a GGUF-dequantised model leaves it."""
    gen = torch.Generator().manual_seed(seed)
    for m in loaded.adapter.layers(loaded.model).modules():
        if isinstance(m, nn.Linear):
            q, d, lo = asymmetric_blocks(m.weight.detach(), 32)
            a = torch.randn(rank, m.in_features, generator=gen) * 0.1
            b = torch.randn(m.out_features, rank, generator=gen) * 0.01
            m.weight.data = dequantize_blocks(q, d, lo, 32) + b @ a
            m.pf_lowrank = (a, b)
    return loaded


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_grid_rewrite_is_exact_and_beats_round_to_nearest(tiny_llama, tmp_path):
    loaded = _on_grid_with_lowrank(load_model(tiny_llama))
    save_model(loaded, tmp_path / "m")
    loaded = load_model(tmp_path / "m")           # the factors come back from the saved directory
    ids = torch.randint(0, 400, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = loaded.adapter.export_module(loaded)(ids)
    gridded, report = grid_model(loaded, 32)
    assert report.linears == report.with_lowrank == 6 * 7 and report.lowrank_rank == 2
    assert report.exact_blocks == report.blocks > 0
    with torch.inference_mode():
        out = gridded.adapter.export_module(gridded)(ids)
    assert float((out - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    # quantized: the integers written are the grid's, so only int8 activations and the int8
    # head differ from fp32; plain round-to-nearest of the same weights is much further off
    gq, plan = quantize_for_executorch(gridded.adapter.export_module(gridded), "8da4w", 32, lm_head="int8")
    assert plan.calibrated == 42 and plan.side_params == report.side_params and not plan.skipped
    rq, _ = quantize_for_executorch(loaded.adapter.export_module(loaded), "8da4w", 32, lm_head="int8")
    with torch.inference_mode():
        e_grid = float((gq(ids) - ref).pow(2).mean())
        e_rtn = float((rq(ids) - ref).pow(2).mean())
    assert e_grid < 0.25 * e_rtn, (e_grid, e_rtn)


def test_grid_generation_program_runs_in_executorch(tiny_llama_1l, tmp_path):
    """auto picks grid for a model with low-rank factors; the KV-cache .pte matches its eager
    module and decodes like it. (One layer: lowering time grows with the linears.)"""
    loaded = _on_grid_with_lowrank(load_model(tiny_llama_1l))
    cfg = ExportConfig(formats=["pte"], quantize="8da4w", lm_head="int8", seq_len=16, max_len=32,
                       greedy_tokens=8, min_delegated_flops=None, etrecord=False)
    module = loaded.adapter.export_module(loaded)
    work, group, rounding, rotation = _calibrated_rounding(loaded, module, cfg)
    assert rounding["method"] == "grid" and rotation is None and group == 32
    assert rounding["exact_share"] == 1.0
    rec = export_generation(work, tmp_path, "pte", cfg, stem="model-8da4w", extra={},
                            group_size=group, rounding=rounding, rotation=rotation)
    q = rec.details["quantization"]
    assert q["rounding"] == "grid" and q["side_params"] > 0 and q["calibrated"] == 1 * 7
    assert rec.parity["passed"], rec.parity
    assert rec.parity["greedy_match_prefix"] >= 4, rec.parity
    # rtn asked for explicitly: no grid
    _, _, report, _ = _calibrated_rounding(loaded, module, dataclasses.replace(cfg, rounding="rtn"))
    assert report is None


def test_grid_with_an_int4_head_rounds_the_head_by_gptq(tiny_llama, small_text):
    """With calibration data and an int4 head, grid rounding leaves the layers' integers to the
    grid and GPTQ-rounds the head alone; its output error is below the round-to-nearest head's."""
    loaded = _on_grid_with_lowrank(load_model(tiny_llama))
    module = loaded.adapter.export_module(loaded)
    cfg = ExportConfig(formats=["pte"], quantize="8da4w", calibration=str(small_text),
                       calibration_samples=8, calibration_seq_len=32)
    work, group, rounding, _ = _calibrated_rounding(loaded, module, cfg)
    assert rounding["method"] == "grid" and rounding["head"]["rounded"] == 1
    assert rounding["head"]["relative_output_error_gptq"] < rounding["head"]["relative_output_error_rtn"]
    bases = [m for m in work.model.modules() if getattr(m, "pf_rounding", None) is not None]
    assert len(bases) == 6 * 7 + 1          # the grid's 42 base linears and the head
    plain, _, _, _ = _calibrated_rounding(loaded, module, dataclasses.replace(cfg, calibration=None))
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = module(ids)
        errs = []
        for w in (work, plain):
            q, plan = quantize_for_executorch(w.adapter.export_module(w), "8da4w", group)
            errs.append(float((q(ids) - ref).pow(2).mean()))
    assert plan.calibrated == 42 and errs[0] < errs[1], errs


def test_grid_bad_input(tiny_llama):
    for bad in ({"quantize": "int8", "rounding": "grid"},
                {"quantize": "8da4w", "rounding": "grid", "rotation": "on"},
                {"quantize": "8da4w", "rounding": "grid", "group_size": 0},
                {"quantize": "8da4w", "group_size": -1}):
        with pytest.raises(BadInputError) as e:
            ExportConfig(formats=["pte"], **bad).validate()
        assert e.value.field in ("rounding", "rotation", "group_size")
    loaded = load_model(tiny_llama)
    with pytest.raises(BadInputError, match="multiple of group 48") as e:
        grid_model(loaded, 48)
    assert e.value.field == "group_size"


def test_builtin_smollm2_is_on_the_grid_and_keeps_its_perplexity_in_4_bits(shared_data):
    """The built-in SmolLM2 is a Q4_1 GGUF dequantised: grid rounding finds every block exact, and
    the 8da4w model (eager torchao, int8 head) stays within 3% of fp32 perplexity on a held-out
    window, where round-to-nearest symmetric int4 costs far more."""
    from pocketformer.data import DataSpec, load_for
    from pocketformer.evaluation import EvalOptions, evaluate

    loaded = load_model("smollm2")
    ev = load_for("text", DataSpec.parse(f"{shared_data['wikitext']}@0.9:1"))
    opts = EvalOptions(seq_len=128, max_windows=6)
    fp32 = evaluate(loaded, "ppl", ev, opts=opts).value
    gridded, report = grid_model(loaded, 32)
    assert report.exact_blocks / report.blocks > 0.999, report.to_dict()

    def ppl_of(work):
        qm, plan = quantize_for_executorch(work.adapter.export_module(work), "8da4w", 32, lm_head="int8")
        def fn(ids):
            with torch.inference_mode():
                return qm(ids)
        return evaluate(work, "ppl", ev, fn=fn, opts=opts).value, plan

    grid_ppl, plan = ppl_of(gridded)
    assert plan.calibrated == 30 * 7
    rtn_ppl, _ = ppl_of(loaded)
    assert math.isfinite(grid_ppl) and grid_ppl < 1.03 * fp32, (grid_ppl, fp32)
    assert rtn_ppl > 1.1 * fp32, (rtn_ppl, fp32)
