"""layered-prune on tiny configs: criteria agree on structure, recovery moves the right way,
per-layer widths save and reload, GQA groups stay whole."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pocketformer.cli import main
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.compress.criteria import CRITERIA, CriterionOptions, select_layers
from pocketformer.data import DataSpec, load_for
from pocketformer.errors import BadInputError
from pocketformer.models import load_model, save_model

from conftest import STS_DEV


def _calib(loaded, path, n=16):
    return Calibration(load_for(loaded.adapter.data_kind, DataSpec.parse(path)), seq_len=32,
                       max_samples=n, batch_size=4)


def _pruned_with_targets(path, text, n):
    """The tiny model with layers 1, 3 and 4 removed, its unpruned teacher, n calibration
    samples in batches and the teacher's top-8 targets on them."""
    import copy

    from pocketformer.compress.recovery import TeacherTargets
    from pocketformer.models import LoadedModel

    loaded = load_model(path)
    teacher = LoadedModel(loaded.adapter, copy.deepcopy(loaded.model), loaded.tokenizer,
                          loaded.source, dict(loaded.extras))
    batches = _calib(loaded, text, n=n).inputs(loaded)
    targets = TeacherTargets(teacher, batches, top_k=8)
    loaded.adapter.keep_layers(loaded.model, [0, 2, 5])
    return loaded, teacher, batches, targets


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_selects_k_distinct_layers(criterion, tiny_llama, small_text):
    loaded = load_model(tiny_llama)
    batches = _calib(loaded, small_text).inputs(loaded)
    sel = select_layers(criterion, loaded, batches, 2, CriterionOptions(bootstrap=50))
    assert len(sel.remove) == 2 and len(set(sel.remove)) == 2
    assert all(0 <= i < 6 for i in sel.remove) and sorted(sel.order) == sel.remove
    if criterion == "gromov":
        assert sel.remove[1] == sel.remove[0] + 1
    if criterion == "personalized":
        r = sel.details["rounds"][0]
        assert len(r["scores"]) == 6 and all(lo <= hi for lo, hi in zip(r["interval_low"], r["interval_high"]))
        assert sel.details["classes"].count("common") == 2
        assert 1 <= r["stable_after_samples"] <= r["samples"]


def test_personalized_sketch_tracks_exact_output_change(tiny_llama, small_text):
    """The sketched Fisher distortion ranks layers as the exact second-order KL does."""
    from pocketformer.compress.criteria import fisher_metric, measurement_matrix
    from pocketformer.compress.probe import LayerProbe

    loaded = load_model(tiny_llama)
    batches = _calib(loaded, small_text).inputs(loaded)
    probe = LayerProbe(loaded)
    with torch.inference_mode():
        traces = [probe.trace(b, range(6)) for b in batches]
        G = fisher_metric(probe, traces)
        _, S = measurement_matrix(G, G.shape[0], CriterionOptions(sketch_dim=48))
        exact, sketched = [], []
        for pos in range(6):
            e = s = 0.0
            for t in traces:
                dz = probe.features(t, probe.without(t, pos)) - probe.features(t, t.final)
                e += float(((dz.double() @ G) * dz.double()).sum())
                s += float(((dz @ S.T) ** 2).sum())
            exact.append(e)
            sketched.append(s)
    from scipy.stats import spearmanr
    assert spearmanr(exact, sketched).statistic >= 0.9
    for e, s in zip(exact, sketched):
        assert s == pytest.approx(e, rel=0.6)


def test_step_buffered_recovery_reduces_distortion(tiny_llama, small_text, tmp_path):
    method = get_method("layered-prune")
    results = {}
    for recovery in ("none", "lsq", "distill"):
        loaded = load_model(tiny_llama)
        teacher = load_model(tiny_llama)
        calib = _calib(loaded, small_text)
        # ce_weight 0: pure distillation, so "closer to the teacher" is the objective measured
        cfg = parse_params(method, {"remove_layers": 2, "steps": 2, "recovery": recovery,
                                    "recovery_minutes": 0.1, "lr": 1e-4, "bootstrap": 50,
                                    "ce_weight": 0.0})
        rec = run_step(loaded, "layered-prune", cfg, calib)
        assert rec["details"]["layers_after"] == 4 and len(rec["details"]["steps"]) == 2
        batches = calib.inputs(loaded)
        with torch.inference_mode():
            s = loaded.adapter.export_module(loaded)
            t = teacher.adapter.export_module(teacher)
            results[recovery] = sum(float(((s(*b) - t(*b)) ** 2).mean()) for b in batches)
        if recovery == "distill":
            for st in rec["details"]["steps"]:
                assert st["recovery"]["steps"] >= 3
                assert st["recovery"]["loss_last"] < st["recovery"]["loss_first"]
        if recovery != "none":   # both recoveries are timed, the closed form too
            assert all(st["recovery"]["seconds"] > 0 for st in rec["details"]["steps"])
            assert rec["details"]["recovery_seconds"] == pytest.approx(
                sum(st["recovery"]["seconds"] for st in rec["details"]["steps"]), abs=0.11)
    assert results["lsq"] < results["none"]
    assert results["distill"] < results["none"]


def test_low_rank_recovery_changes_each_linear_by_rank_r_and_saves_the_factors(tiny_llama, small_text,
                                                                              tmp_path):
    """recovery_rank: over two steps the kept linears change by exactly B A (rank <= r, the same
    factors both steps), norms still train, the distortion drops, and the factors save and
    reload beside an ordinary weights file."""
    method = get_method("layered-prune")
    loaded, teacher = load_model(tiny_llama), load_model(tiny_llama)
    before = {id(m): m.weight.detach().clone() for m in loaded.model.modules()
              if isinstance(m, torch.nn.Linear)}
    calib = _calib(loaded, small_text)
    cfg = parse_params(method, {"remove_layers": 2, "steps": 2, "recovery": "distill",
                                "recovery_minutes": 0.1, "lr": 1e-3, "bootstrap": 50,
                                "ce_weight": 0.0, "recovery_rank": 3})
    rec = run_step(loaded, "layered-prune", cfg, calib)
    assert [s["recovery"]["rank"] for s in rec["details"]["steps"]] == [3, 3]
    linears = [m for m in loaded.adapter.layers(loaded.model).modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7
    for m in linears:
        a, b = m.pf_lowrank
        delta = m.weight - before[id(m)]
        assert torch.allclose(delta, b @ a, atol=1e-6)
        assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 3
    assert any(float((m.pf_lowrank[1]).abs().max()) > 0 for m in linears)
    norm = loaded.adapter.layers(loaded.model)[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))      # norms train beside the factors
    batches = calib.inputs(loaded)
    with torch.inference_mode():
        s = loaded.adapter.export_module(loaded)
        t = teacher.adapter.export_module(teacher)
        recovered = sum(float(((s(*b) - t(*b)) ** 2).mean()) for b in batches)
    plain = load_model(tiny_llama)
    plain.adapter.keep_layers(plain.model, [i for i in range(6) if i not in rec["details"]["removed"]])
    with torch.inference_mode():
        p = plain.adapter.export_module(plain)
        unrecovered = sum(float(((p(*b) - t(*b)) ** 2).mean()) for b in batches)
    assert recovered < unrecovered
    save_model(loaded, tmp_path / "m")
    assert (tmp_path / "m" / "pocketformer_lowrank.safetensors").is_file()
    again = load_model(tmp_path / "m")
    for m, n in zip(linears, [x for x in again.adapter.layers(again.model).modules()
                              if isinstance(x, torch.nn.Linear)]):
        assert torch.equal(m.pf_lowrank[0], n.pf_lowrank[0]) and torch.equal(m.weight, n.weight)
    # full fine-tuning afterwards: the weights are no longer base + B A, the factors go
    cfg = parse_params(method, {"remove_layers": 1, "recovery": "distill", "recovery_minutes": 0.02,
                                "lr": 1e-4, "bootstrap": 50})
    run_step(again, "layered-prune", cfg, _calib(again, small_text))
    assert not any(hasattr(m, "pf_lowrank") for m in again.model.modules())
    with pytest.raises(BadInputError, match="width pruning"):
        parse_params(method, {"ffn_keep": 0.5, "recovery": "distill", "recovery_rank": 4}).validate()


def test_gqa_head_pruning_and_per_layer_widths_reload(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = load_model(tiny_llama)
    adapter = loaded.adapter
    layers = adapter.layers(loaded.model)
    ids = adapter.example_inputs(loaded, seq_len=12)
    adapter.keep_kv_heads(layers[1], loaded.config, [1])          # 1 of 2 KV groups
    adapter.keep_ffn_channels(layers[2], list(range(0, 128, 2)))  # 64 of 128 channels
    info = adapter.describe(loaded.model)
    assert info["attention_heads"][1] == 2 and info["kv_heads"][1] == 1   # whole group of 2 kept
    assert info["head_dim"] == 16 and info["ffn_widths"][2] == 64
    with torch.inference_mode():
        expected = adapter.export_module(loaded)(*ids)
    save_model(loaded, tmp_path / "het")
    config = json.loads((tmp_path / "het" / "config.json").read_text())
    assert config["pocketformer_layers"][1] == {"num_attention_heads": 2, "num_key_value_heads": 1,
                                                "intermediate_size": 128}
    again = load_model(tmp_path / "het")
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*ids), expected)
    # Uniform widths stay loadable by plain transformers.
    uni = load_model(tiny_llama)
    for layer in uni.adapter.layers(uni.model):
        uni.adapter.keep_kv_heads(layer, uni.config, [0])
        uni.adapter.keep_ffn_channels(layer, range(96))
    save_model(uni, tmp_path / "uni")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uni")
    assert plain.config.num_attention_heads == 2 and plain.config.num_key_value_heads == 1
    assert plain.config.intermediate_size == 96 and plain.config.head_dim == 16
    with torch.inference_mode():
        torch.testing.assert_close(plain(input_ids=ids[0]).logits,
                                   uni.adapter.export_module(uni)(*ids))


def test_layered_prune_bad_input(tiny_llama, tiny_bert, small_text, tmp_path, capsys):
    base = ["compress", "--model", str(tiny_llama), "--method", "layered-prune", "--out", str(tmp_path / "o")]
    assert main(base + ["--remove-layers", "6", "--calibration", str(small_text)]) == 2
    assert "the model has 6" in capsys.readouterr().err
    assert main(base + ["--remove-layers", "2"]) == 2
    assert "--calibration" in capsys.readouterr().err
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("too short")
    assert main(base + ["--remove-layers", "2", "--calibration", str(tiny_text)]) == 2
    assert "tokens" in capsys.readouterr().err
    assert main(["compress", "--model", str(tiny_bert), "--method", "layered-prune",
                 "--remove-layers", "1", "--recovery", "lsq", "--criterion", "last",
                 "--calibration", f"{STS_DEV}@0:0.05", "--out", str(tmp_path / "o")]) == 2
    assert "pre-norm" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="steps"):
        parse_params(get_method("layered-prune"), {"remove_layers": 2, "steps": 3})
    # a recovery device that is not a torch device, or one this process cannot use
    for device, says in (("tpu", "expected cpu, cuda or cuda:N"), ("cuda:99", "CUDA device")):
        assert main(base + ["--remove-layers", "2", "--calibration", str(small_text),
                            "--recovery", "distill", "--device", device]) == 2
        err = capsys.readouterr().err
        assert "device" in err and says in err, err
    assert not (tmp_path / "o").exists()


def test_depth_plus_width_hits_params_target_and_reloads(tiny_llama, small_text, tmp_path):
    loaded = load_model(tiny_llama)
    before = loaded.adapter.describe(loaded.model)
    cfg = parse_params(get_method("layered-prune"), {
        "remove_layers": 1, "params_fraction": 0.35, "kv_keep": 0.5, "width_multiple": 16,
        "steps": 1, "bootstrap": 50})
    rec = run_step(loaded, "layered-prune", cfg, _calib(loaded, small_text))
    after = loaded.adapter.describe(loaded.model)
    removed = 1 - after["non_embedding_params"] / before["non_embedding_params"]
    assert 0.30 <= removed <= 0.40, removed       # rounding widths up keeps a little more
    assert after["num_layers"] == 5
    assert all(w % 16 == 0 and 16 <= w <= 128 for w in after["ffn_widths"])
    assert all(h == 2 * kv for h, kv in zip(after["attention_heads"], after["kv_heads"]))  # whole groups
    assert sum(after["kv_heads"]) == 5            # half of 2 groups x 5 layers
    assert len(set(after["ffn_widths"])) > 1, "widths follow each layer's importance"
    assert rec["details"]["steps"][0]["width"]["ffn_widths"] == after["ffn_widths"]
    ids = loaded.adapter.example_inputs(loaded, seq_len=12)
    with torch.inference_mode():
        expected = loaded.adapter.export_module(loaded)(*ids)
    save_model(loaded, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.adapter.describe(again.model)["ffn_widths"] == after["ffn_widths"]
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*ids), expected)


def test_vit_per_layer_widths_reload(tiny_vit_config, tmp_path):
    """transformers 5 saves ViT under its legacy checkpoint names; a per-layer-width ViT must
    still reload through our loader with identical outputs."""
    loaded = load_model(tiny_vit_config)
    adapter = loaded.adapter
    adapter.keep_ffn_channels(adapter.layers(loaded.model)[1], list(range(0, 64, 2)))
    x = adapter.example_inputs(loaded, seq_len=0)
    with torch.inference_mode():
        expected = adapter.export_module(loaded)(*x)
    save_model(loaded, tmp_path / "vit")
    again = load_model(tmp_path / "vit")
    assert again.adapter.describe(again.model)["ffn_widths"] == [64, 32, 64, 64]
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*x), expected)


def test_vit_distill_recovery_from_the_cli(tiny_vit_config, digits_npz, tmp_path):
    """A classifier's teacher targets are sized per image (it has no vocabulary): layered-prune
    with distillation runs on a ViT from the CLI, caches the targets and writes a smaller model."""
    out = tmp_path / "vit"
    rc = main(["compress", "--model", str(tiny_vit_config), "--method", "layered-prune",
               "--remove-layers", "1", "--recovery", "distill", "--recovery-minutes", "0.05",
               "--calibration", str(digits_npz), "--out", str(out)])
    assert rc == 0
    again = load_model(out)
    assert len(again.adapter.layers(again.model)) == 3
    from pocketformer.compress.recovery import TeacherTargets
    teacher = load_model(tiny_vit_config)
    batches = _calib(teacher, digits_npz).inputs(teacher)
    targets = TeacherTargets(teacher, batches)
    assert TeacherTargets.size_bytes(teacher, batches) == targets.bytes


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_bert"])
def test_cached_teacher_targets_give_the_live_teachers_loss(family, request, small_text):
    """Recovery with the teacher's outputs computed once (TeacherTargets) optimises the same
    objective as running the teacher live: same first-step loss, and the teacher is not run."""
    import copy

    from pocketformer.compress.recovery import DistillOptions, TeacherTargets, distill
    from pocketformer.models import LoadedModel

    path = request.getfixturevalue(family)
    data = small_text if family == "tiny_llama" else f"{STS_DEV}@0:0.05"
    results = {}
    for cached in (False, True):
        loaded = load_model(path)
        teacher = LoadedModel(loaded.adapter, copy.deepcopy(loaded.model), loaded.tokenizer,
                              loaded.source, dict(loaded.extras))
        batches = _calib(loaded, data, n=8).inputs(loaded)
        targets = TeacherTargets(teacher, batches) if cached else None
        kept = [i for i in range(len(loaded.adapter.layers(loaded.model))) if i != 2]
        loaded.adapter.keep_layers(loaded.model, kept)
        calls = []
        hook = teacher.adapter.layers(teacher.model)[0].register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(0)
        rec = distill(loaded, teacher, kept, batches,
                      DistillOptions(minutes=0.02, seed=0), targets=targets)
        hook.remove()
        results[cached] = rec
        assert rec["steps"] >= 1
        assert (len(calls) == 0) == cached
    # same weights, same (seeded) first batch: the same loss up to the fp16 storage
    assert results[True]["loss_step1"] == pytest.approx(results[False]["loss_step1"], rel=2e-3)


def test_top_k_teacher_targets_bound_and_match_the_full_kl(tiny_llama, small_text):
    """The top-k teacher cache (k tokens + "any other") gives the KL of the coarsened
    distributions: at most the full KL, equal to it when k covers the vocabulary; it stores
    k values per position instead of the vocabulary, and distillation runs on it."""
    import copy

    from pocketformer.compress.recovery import (DistillOptions, TeacherTargets, TopK, _kd_loss,
                                                distill)
    from pocketformer.models import LoadedModel

    loaded = load_model(tiny_llama)
    teacher = LoadedModel(loaded.adapter, copy.deepcopy(loaded.model), loaded.tokenizer,
                          loaded.source, dict(loaded.extras))
    batches = _calib(loaded, small_text, n=8).inputs(loaded)
    vocab = loaded.model.config.vocab_size
    full = TeacherTargets(teacher, batches)
    top = TeacherTargets(teacher, batches, top_k=8)
    every = TeacherTargets(teacher, batches, top_k=vocab)
    assert isinstance(top.outputs[0], TopK) and top.outputs[0].index.shape[-1] == 8
    assert top.bytes < full.bytes
    assert TeacherTargets.size_bytes(teacher, batches, 8) >= top.bytes
    # a student that differs from the teacher: the pruned model
    loaded.adapter.keep_layers(loaded.model, [0, 5])
    with torch.no_grad():
        s_out = loaded.adapter.export_module(loaded)(*batches[0]).float()
    kl_full = _kd_loss("llama", s_out, full.outputs[0], t_is_logp=True).item()
    kl_top = _kd_loss("llama", s_out, top.outputs[0]).item()
    kl_every = _kd_loss("llama", s_out, every.outputs[0]).item()
    assert kl_full > 1e-3
    assert 0 < kl_top <= kl_full + 1e-4
    assert kl_every == pytest.approx(kl_full, rel=1e-2)
    rec = distill(loaded, teacher, [0, 5], batches, DistillOptions(minutes=0.02, seed=0),
                  targets=top)
    assert rec["steps"] >= 1 and math.isfinite(rec["loss_last"])
    with pytest.raises(BadInputError, match="teacher_top_k"):
        parse_params(get_method("layered-prune"), {"remove_layers": 2, "teacher_top_k": -1})


def test_bf16_recovery_trains_fp32_parameters_on_a_bf16_forward(tiny_llama, small_text):
    """recovery_precision = bf16: the student runs under CPU bf16 autocast, so its first loss is
    the fp32 one up to bf16 rounding (not another objective), the trained parameters and the
    low-rank factors stay fp32, the record names the precision, and unknown precisions are
    refused."""
    from pocketformer.compress.recovery import DistillOptions, LowRank, distill

    recs = {}
    for precision in ("fp32", "bf16"):
        loaded, teacher, batches, targets = _pruned_with_targets(tiny_llama, small_text, 8)
        lowrank = LowRank(4, seed=0)
        recs[precision] = distill(loaded, teacher, [0, 2, 5], batches,
                                  DistillOptions(minutes=0.02, lr=5e-3, seed=0, rank=4,
                                                 precision=precision),
                                  targets=targets, lowrank=lowrank)
        assert recs[precision]["precision"] == precision and recs[precision]["steps"] >= 1
        assert recs[precision]["device"] == "cpu"
        assert math.isfinite(recs[precision]["loss_last"])
        assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
        assert all(a.dtype == torch.float32 and b.dtype == torch.float32
                   for _, a, b in lowrank.factors.values())
        assert any(bool(b.abs().sum() > 0) for _, _, b in lowrank.factors.values())  # it trained
    assert recs["bf16"]["loss_step1"] == pytest.approx(recs["fp32"]["loss_step1"], rel=2e-2)
    assert recs["bf16"]["loss_step1"] != recs["fp32"]["loss_step1"]   # it did run in bf16
    with pytest.raises(BadInputError, match="recovery_precision"):
        parse_params(get_method("layered-prune"), {"remove_layers": 2, "recovery": "distill",
                                                   "recovery_precision": "fp16"}).validate()


def test_auto_precision_is_bf16_only_where_the_device_runs_it_natively(tiny_llama, small_text,
                                                                       monkeypatch, capsys):
    """precision "auto": bf16 where the CPU (AVX512-BF16/AMX) or GPU runs bf16 matmuls natively,
    fp32 where bf16 would be emulated (31x slower per step on an AVX2-only CPU); the record names
    what ran and what was asked. An explicit bf16 on such a device runs, with a warning."""
    from pocketformer.compress import recovery
    from pocketformer.compress.recovery import DistillOptions, distill, resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(recovery, "native_bf16", lambda device: False)
    assert resolve_precision("auto", cpu, "t") == "fp32"
    assert resolve_precision("bf16", cpu, "t") == "bf16"
    assert "emulated" in capsys.readouterr().err
    assert resolve_precision("fp32", cpu, "t") == "fp32"
    monkeypatch.setattr(recovery, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu, "t") == "bf16"
    assert resolve_precision("bf16", cpu, "t") == "bf16"
    assert "emulated" not in capsys.readouterr().err
    monkeypatch.undo()

    loaded, teacher, batches, targets = _pruned_with_targets(tiny_llama, small_text, 8)
    rec = distill(loaded, teacher, [0, 2, 5], batches,
                  DistillOptions(minutes=0.01, lr=5e-3, seed=0, precision="auto"), targets=targets)
    assert rec["precision"] == ("bf16" if recovery.native_bf16(cpu) else "fp32")
    assert rec["precision_asked"] == "auto" and rec["steps"] >= 1
    parse_params(get_method("layered-prune"), {"remove_layers": 2, "recovery": "distill",
                                               "recovery_precision": "auto"}).validate()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (run on a GPU machine; CI has none)")
def test_low_rank_recovery_on_cuda_starts_from_the_cpu_loss_and_comes_back(tiny_llama, small_text,
                                                                          tmp_path):
    """device = cuda: the teacher's targets and both recovery steps run on the GPU, the
    criteria and the saved model on the CPU. The first recovery loss is the CPU run's (fp32, up
    to kernel rounding, same seed and factors), the factors train there, and the model, its
    factors and the record come back to the CPU and save."""
    method = get_method("layered-prune")
    recs, models = {}, {}
    for device in ("cpu", "cuda"):
        loaded = load_model(tiny_llama)
        cfg = parse_params(method, {"remove_layers": 2, "steps": 2, "recovery": "distill",
                                    "recovery_minutes": 0.1, "lr": 1e-3, "bootstrap": 50,
                                    "recovery_rank": 3, "teacher_top_k": 8, "device": device})
        recs[device] = run_step(loaded, "layered-prune", cfg, _calib(loaded, small_text))["details"]
        models[device] = loaded
        assert {t.device.type for t in [*loaded.model.parameters(), *loaded.model.buffers()]} == {"cpu"}
        linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)
                   and hasattr(m, "pf_lowrank")]
        assert linears and all(t.device.type == "cpu" for m in linears for t in m.pf_lowrank)
        assert any(float(m.pf_lowrank[1].abs().max()) > 0 for m in linears)      # it trained
        for step in recs[device]["steps"]:
            assert step["recovery"]["steps"] >= 1
            assert step["recovery"]["device"].startswith(device)
    assert recs["cuda"]["steps"][0]["removed"] == recs["cpu"]["steps"][0]["removed"]
    assert recs["cuda"]["steps"][0]["recovery"]["loss_step1"] == pytest.approx(
        recs["cpu"]["steps"][0]["recovery"]["loss_step1"], rel=1e-2)
    save_model(models["cuda"], tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert len(again.adapter.layers(again.model)) == 4


def test_recovery_holdout_keeps_the_parameters_at_the_lowest_held_out_loss(tiny_llama, small_text):
    """recovery_holdout h: a share h of the batches is never trained on, the loss on them is
    taken before the first step and through the budget, and the parameters at its lowest are
    the ones kept. With a learning rate that wrecks the model every later check is worse (or not
    a number), so the model comes back exactly as it started; without the holdout it does not.
    Shares that leave nothing to hold out or to train on are refused."""
    from pocketformer.compress.recovery import DistillOptions, distill

    for holdout in (0.25, 0.0):
        loaded, teacher, batches, targets = _pruned_with_targets(tiny_llama, small_text, 16)
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        rec = distill(loaded, teacher, [0, 2, 5], batches,
                      DistillOptions(minutes=0.03, lr=50.0, seed=0, holdout=holdout),
                      targets=targets)
        after = loaded.model.state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert rec["steps"] >= 2
        if holdout:
            assert rec["holdout_batches"] == 1 and rec["tokens"] == rec["steps"] * batches[0][0].numel()
            curve = rec["holdout_curve"]
            assert curve[0][0] == 0 and len(curve) >= 2 and rec["holdout_best_step"] == 0
            assert all(not v < curve[0][1] for _, v in curve[1:])
            assert unchanged
        else:
            assert "holdout_curve" not in rec and not unchanged
    with pytest.raises(BadInputError, match="recovery_holdout"):
        distill(loaded, teacher, [0, 2, 5], batches[:2], DistillOptions(minutes=0.01, holdout=0.2),
                targets=targets)
    with pytest.raises(BadInputError, match="recovery_holdout"):
        parse_params(get_method("layered-prune"), {"remove_layers": 2, "recovery": "distill",
                                                   "recovery_holdout": 0.5}).validate()


def test_final_recovery_share_gives_the_last_step_its_share(tiny_llama, small_text):
    """final_recovery_share f: the last step's recovery gets f of the budget left after the
    teacher's targets, the earlier steps split the rest evenly; out of (0, 1) is refused."""
    method = get_method("layered-prune")
    loaded = load_model(tiny_llama)
    cfg = parse_params(method, {"remove_layers": 3, "steps": 3, "recovery": "distill",
                                "recovery_minutes": 0.06, "final_recovery_share": 0.5,
                                "lr": 1e-3, "bootstrap": 50, "teacher_top_k": 8})
    rec = run_step(loaded, "layered-prune", cfg, _calib(loaded, small_text))["details"]
    budgets = [s["recovery"]["budget_seconds"] for s in rec["steps"]]
    left = 0.06 * 60 - rec["teacher_targets"]["seconds"]
    assert budgets[0] == pytest.approx(budgets[1]) == pytest.approx(left / 4, rel=0.05)
    assert budgets[2] == pytest.approx(left / 2, rel=0.05)
    assert all(s["recovery"]["steps"] >= 1 for s in rec["steps"])
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(BadInputError, match="final_recovery_share"):
            parse_params(method, {"remove_layers": 2, "steps": 2, "recovery": "distill",
                                  "final_recovery_share": bad}).validate()


def test_recovery_max_passes_ends_each_recovery_at_its_share_of_the_passes(tiny_llama, small_text):
    """recovery_max_passes P: with time to spare, each step's recovery stops after its share of
    P passes over the calibration batches (split as the minutes are) and says so; with a cap it
    never reaches, time ends it as before; values <= 0 are refused."""
    from pocketformer.compress.recovery import DistillOptions, distill

    method = get_method("layered-prune")
    loaded = load_model(tiny_llama)
    calib = _calib(loaded, small_text)
    n_batches = len(calib.inputs(loaded))
    cfg = parse_params(method, {"remove_layers": 3, "steps": 3, "recovery": "distill",
                                "recovery_minutes": 10, "final_recovery_share": 0.5,
                                "recovery_max_passes": 4, "lr": 1e-3, "bootstrap": 50,
                                "teacher_top_k": 8})
    rec = run_step(loaded, "layered-prune", cfg, calib)["details"]
    recs = [s["recovery"] for s in rec["steps"]]
    assert [r["max_passes"] for r in recs] == pytest.approx([1.0, 1.0, 2.0])
    assert [r["steps"] for r in recs] == [n_batches, n_batches, 2 * n_batches]
    assert all(r["stopped_by"] == "passes" and r["seconds"] < r["budget_seconds"] / 4 for r in recs)
    assert [r["passes"] for r in recs] == pytest.approx([1.0, 1.0, 2.0])

    loaded, teacher, batches, targets = _pruned_with_targets(tiny_llama, small_text, 16)
    r = distill(loaded, teacher, [0, 2, 5], batches,
                DistillOptions(minutes=0.02, lr=1e-3, seed=0, max_passes=1e6), targets=targets)
    assert r["stopped_by"] == "time" and 1 <= r["steps"] < r["max_steps"]
    with pytest.raises(BadInputError, match="recovery_max_passes"):
        distill(loaded, teacher, [0, 2, 5], batches, DistillOptions(minutes=0.01, max_passes=0),
                targets=targets)
    for bad in (0, -1.0):
        with pytest.raises(BadInputError, match="recovery_max_passes"):
            parse_params(method, {"remove_layers": 2, "recovery": "distill",
                                  "recovery_max_passes": bad}).validate()


def test_layer_set_search_exchange_reuses_the_prefix_exactly(tiny_llama, small_text, monkeypatch):
    """benchmarks/layer_set_search.py scores an exchange from the current set's recorded prefix;
    that must be the loss of the new set computed from scratch, or its local-optimum claim
    (docs/layered_pruning.md) would rest on wrong numbers."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from layer_set_search import SetLoss

    loaded = load_model(tiny_llama)
    batches = _calib(loaded, small_text, n=8).inputs(loaded)
    search = SetLoss(loaded, batches)
    base = search.reset({1, 4})
    for back, out in [(1, 0), (4, 5), (1, 3), (4, 2)]:
        swapped = search.swap(back, out)
        fresh = SetLoss(loaded, batches).reset(({1, 4} - {back}) | {out})
        assert swapped == pytest.approx(fresh, rel=1e-5), (back, out)
        assert search.swap(back, out, bound=min(swapped, base) * 0.5) == math.inf
    assert search.reset({1, 4}) == pytest.approx(base, rel=1e-6)
