"""SEE and the SVD baseline on tiny models: structure, save/reload, export parity, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pocketformer.cli import main
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.data import DataSpec, load_for
from pocketformer.export import ExportConfig, export_model
from pocketformer.models import load_model, save_model
from pocketformer.models.factored import (EntangledEmbedding, EntangledHead, ExactRows, ExactRowsHead,
                                          FactoredEmbedding, LowRankRows, ZeroRows)

from conftest import STS_DEV

FAST = {"hidden_minutes": 0.02, "distill_minutes": 0.02}


def _calib(loaded, path):
    return Calibration(load_for(loaded.adapter.data_kind, DataSpec.parse(path)), seq_len=32,
                       max_samples=16, batch_size=4)


def _student_off_its_teacher(path, data: str):
    """A model whose embedding is moved off its teacher's (a clone taken before), one calibration
    batch, and Adam groups at learning rate 0: every stage step then sees the same student, so a
    loss's first value can be compared term by term."""
    loaded = load_model(path)
    calib = _calib(loaded, data)
    teacher = loaded.clone()
    emb = loaded.adapter.embeddings(loaded.model)
    with torch.no_grad():
        emb.weight.add_(0.5 * torch.randn_like(emb.weight))
    return loaded, teacher, calib, calib.inputs(loaded)[:1], [{"params": list(emb.parameters()), "lr": 0.0}]


def test_see_on_a_tied_decoder_saves_reloads_and_exports(tiny_llama_1l, small_text, tmp_path):
    """SEE with a share of the budget spent on exact rows for the calibration's frequent tokens:
    the entangled head and the exact rows' gather/select both go through save, reload and
    export."""
    loaded = load_model(tiny_llama_1l)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    cfg = parse_params(get_method("see"), {"ratio": 4, "reconstruct_steps": 300,
                                           "exact_share": 0.25, **FAST})
    calib = _calib(loaded, small_text)
    rec = run_step(loaded, "see", cfg, calib)
    d = rec["details"]
    assert d["params_after"] * 4 <= d["params_before"] * 1.01 and d["tied_head"]
    emb = loaded.adapter.embeddings(loaded.model)
    assert isinstance(emb, ExactRows) and isinstance(emb.base, EntangledEmbedding)
    assert isinstance(loaded.adapter.lm_head(loaded.model), ExactRowsHead)
    assert d["stage1_rows"]["loss_last"] < d["stage1_rows"]["loss_first"]
    V, dim = E.shape
    K = d["stage1_rows"]["exact_rows"]
    assert K == int(0.25 * V / 4) and d["plan"]["exact_rows"] == K
    # the K most frequent calibration tokens, and they have no entangled terms
    from pocketformer.compress.see import token_counts
    n = token_counts(calib.inputs(loaded), V)
    kept = (emb.slot < K).nonzero().squeeze(-1)
    assert n[kept].min() >= n[emb.slot == K].max()
    assert float(emb.base.coef[kept].abs().sum()) == 0.0
    assert 0.5 < d["stage1_rows"]["exact_calibration_coverage"] <= 1
    # the head gathers on a mode, so the generation program below stores its term weights
    # (models/factored.py stored_term_weights) and its parity covers them
    assert emb.base.head_strategy() != "pairs", emb.base.head_costs()
    ids = loaded.adapter.example_inputs(loaded, seq_len=16)
    with torch.inference_mode():
        expected = loaded.adapter.export_module(loaded)(*ids)
        # the factored head equals the dense product it avoids
        h = torch.randn(3, emb.embedding_dim)
        torch.testing.assert_close(loaded.adapter.lm_head(loaded.model)(h), h @ emb.weight.T,
                                   rtol=1e-4, atol=1e-4)
    entry = _reload_and_export(loaded, ids, expected, tmp_path)
    assert entry["kind"] == "exact-rows" and entry["rows"] == K and entry["base"]["kind"] == "entangled"


@pytest.mark.parametrize("method", ["see", "embed-svd"])
def test_low_rank_tier_between_exact_rows_and_the_factored_rows(tiny_llama_1l, small_text, tmp_path,
                                                               method):
    """tier_share: after the exact rows, the next most frequent calibration tokens get rank-r
    rows of their own table (LowRankRows), the rank-r optimum of their rows before training,
    within the ratio's budget; the composed table saves, reloads and exports with parity."""
    from pocketformer.compress.see import token_counts

    loaded = load_model(tiny_llama_1l)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    V, dim = E.shape
    r = 8
    params = {"ratio": 4, "exact_share": 0.15, "tier_share": 0.2, "tier_rank": r,
              "hidden_minutes": 0, "distill_minutes": 0}
    if method == "see":
        params["reconstruct_steps"] = 50
    calib = _calib(loaded, small_text)
    d = run_step(loaded, method, parse_params(get_method(method), params), calib)["details"]
    assert d["params_after"] * 4 <= d["params_before"]
    emb = loaded.adapter.embeddings(loaded.model)
    assert isinstance(emb, ExactRows) and isinstance(emb.base, LowRankRows)
    tier = emb.base
    K, M = emb.rows_kept, tier.rows_kept
    n = token_counts(calib.inputs(loaded), V)
    # as many rank-r rows as the share pays for after the r x d basis (not capped here: the
    # calibration text uses more tokens than that)
    assert K == int(0.15 * V / 4) and M == int(0.2 * V * dim / 4 / r) - dim - 1 < int((n > 0).sum()) - K
    assert (d["stage1_rows"]["exact_rows"], d["stage1_rows"]["tier_rows"]) == (K, M)
    is_exact, in_tier = emb.slot < K, tier.slot < M
    assert not (is_exact & in_tier).any()
    rest = ~is_exact & ~in_tier
    assert n[is_exact].min() >= n[in_tier].max() and n[in_tier].min() >= n[rest].max()
    # no training: the tier's rows are the rank-r optimum of the original rows (no metric here)
    err = float(((tier.weight[in_tier] - E[in_tier]) ** 2).sum())
    S = torch.linalg.svdvals(E[in_tier].double())
    assert err == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-3)
    torch.testing.assert_close(emb.weight[is_exact], E[is_exact])
    ids = loaded.adapter.example_inputs(loaded, seq_len=16)
    with torch.inference_mode():
        expected = loaded.adapter.export_module(loaded)(*ids)
    entry = _reload_and_export(loaded, ids, expected, tmp_path, generation=False)
    assert entry["kind"] == "exact-rows" and entry["base"]["kind"] == "low-rank-rows"
    assert entry["base"]["rank"] == r


def _reload_and_export(loaded, ids, expected, tmp_path, generation: bool = True) -> dict:
    """Save, reload (same outputs on `ids`), export ONNX and .pte, forward and (with
    `generation`) generation programs, with parity; returns the saved config's embedding entry."""
    save_model(loaded, tmp_path / "m")
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["pocketformer_embedding"]
    again = load_model(tmp_path / "m")
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*ids), expected)
    records = export_model(again, tmp_path / "art", ExportConfig(formats=["onnx", "pte"], seq_len=16,
                                                                 max_len=48, greedy_tokens=8,
                                                                 etrecord=False, generation=generation))
    assert {r.path for r in records} >= ({"model.pte", "model-gen.pte", "model.onnx"} if generation
                                         else {"model.pte", "model.onnx"})
    assert all(r.parity["passed"] for r in records), [r.parity for r in records]
    # the factored embedding's and head's gathers are row copies (index_select), not the generic
    # per-element index.Tensor kernel, and the head's row-wise dots run in XNNPACK (no portable
    # reduction or matmul). Checked on the generation program, the decode path: the forward
    # program keeps transformers' mask construction, which indexes.
    for r in records:
        if r.path.endswith("-gen.pte"):
            slow = set(r.details["delegation"]["portable_ops"]) & {"index", "sum", "bmm", "mm"}
            assert not slow, (r.path, slow)
    return entry


def test_see_order_3_on_a_tied_decoder_saves_reloads_and_exports(tiny_llama_1l, small_text, tmp_path):
    """Order 3 (A (x) B (x) C, in the raw basis 64 = 4 x 4 x 4): three unit tables, C clustered on its own band of
    principal components; stage 1a lowers the row error, the head gathers on one mode and equals
    the dense product, and the model saves, reloads and exports to ONNX and .pte with parity."""
    loaded = load_model(tiny_llama_1l)
    cfg = parse_params(get_method("see"), {"ratio": 4, "order": 3, "basis": "raw",
                                           "reconstruct_steps": 200, **FAST})
    rec = run_step(loaded, "see", cfg, _calib(loaded, small_text))
    d = rec["details"]
    assert d["order"] == 3 and d["factors"] == [4, 4, 4] and d["tied_head"]
    assert d["params_after"] * 4 <= d["params_before"] * 1.01
    assert d["plan"]["units_c"] > 1 and d["stage1_rows"]["loss_last"] < d["stage1_rows"]["loss_first"]
    assert d["stage1_rows"]["als_errors"][-1] < 1.0
    emb = loaded.adapter.embeddings(loaded.model)
    assert isinstance(emb, EntangledEmbedding) and emb.order == 3
    # B and C come from different clusterings: a token's two form units are not one relabelling
    pairs = torch.stack([emb.index_b[:, 0], emb.index_c[:, 0]], 1).unique(dim=0)
    assert len(pairs) > max(int(emb.index_b[:, 0].unique().numel()),
                            int(emb.index_c[:, 0].unique().numel()))
    with torch.inference_mode():
        h = torch.randn(3, emb.embedding_dim)
        torch.testing.assert_close(loaded.adapter.lm_head(loaded.model)(h), h @ emb.weight.T,
                                   rtol=1e-4, atol=1e-4)
    ids = loaded.adapter.example_inputs(loaded, seq_len=16)
    with torch.inference_mode():
        expected = loaded.adapter.export_module(loaded)(*ids)
    # forward programs only: the generation programs' head is this same module (order 2's test
    # exports those), and each costs a minute of lowering on 2 cores
    entry = _reload_and_export(loaded, ids, expected, tmp_path, generation=False)
    assert entry["kind"] == "entangled" and entry["d3"] == 4 and entry["units_c"] == emb.table_c.shape[0]


def test_see_units_come_from_wordnet_on_a_real_vocabulary(tiny_bert):
    """tiny_bert carries all-MiniLM-L6-v2's real WordPiece vocabulary."""
    from pocketformer.compress.see import SEEConfig, plan_units

    loaded = load_model(tiny_bert)
    E = loaded.adapter.embeddings(loaded.model).weight.detach()
    tokens = loaded.adapter.vocabulary(loaded)
    plan = plan_units(tokens, "bert", E, (4, 8), SEEConfig(ratio=4))
    s = plan.stats
    assert 0.4 < s["knowledge_coverage"] < 0.8            # whole words with WordNet senses
    assert s["knowledge_units"] > 0 and s["units_a"] > s["knowledge_units"]
    bank, cls = tokens.index("bank"), tokens.index("[CLS]")
    assert int(plan.active[bank].sum()) == 4              # many senses: full rank
    assert int(plan.active[cls].sum()) <= 2               # no senses: data-driven units
    # Words whose first senses share a hypernym ancestor share a semantic unit
    cat, dog = tokens.index("cat"), tokens.index("dog")
    assert set(plan.index_a[cat].tolist()) & set(plan.index_a[dog].tolist())
    random_plan = plan_units(tokens, "bert", E, (4, 8), SEEConfig(ratio=4, inventory="random"))
    assert torch.equal(random_plan.active, plan.active) and torch.equal(random_plan.index_b, plan.index_b)
    assert not torch.equal(random_plan.index_a, plan.index_a)
    # A knowledge budget smaller than the number of hypernym roots (every adjective synset is
    # one) keeps the roots shared by most senses instead of dropping WordNet altogether.
    tight = plan_units(tokens, "bert", E, (4, 8), SEEConfig(ratio=4, knowledge_share=0.01)).stats
    assert tight["hypernym_depth"] == 0 and 0 < tight["knowledge_units"] < s["knowledge_units"]
    assert 0.1 < tight["knowledge_coverage"] < s["knowledge_coverage"]


def test_see_says_when_capped_unit_tables_leave_the_budget_unspent(tiny_llama_2l, small_text, capsys):
    """At ratio 2 on a 512-token vocabulary, 4-float units would need more clusters than there
    are rows in every table: the record and a message say how much of the budget is used."""
    loaded = load_model(tiny_llama_2l)
    cfg = parse_params(get_method("see"), {"ratio": 2, "order": 3, "basis": "raw",
                                           "reconstruct_steps": 10, **FAST})
    d = run_step(loaded, "see", cfg, _calib(loaded, small_text))["details"]
    V, dim = d["vocab"], d["d"]
    assert d["params_allowed"] == V * dim // 2
    assert d["plan"]["units_b"] == d["plan"]["units_c"] == V          # capped at one per row
    assert d["params_after"] < 0.95 * d["params_allowed"] and d["ratio"] > 2.1
    assert f"only {d['params_after']:,} of the {d['params_allowed']:,} parameters" in capsys.readouterr().err


def test_order_3_plan_spends_the_budget_a_capped_a_table_leaves(tiny_bert):
    """Units of 2-4 floats at order 3 buy more A units than there are tokens without WordNet
    senses to cluster; k-means stops at one cluster per row, and the A budget left over goes to
    the two form tables, so the tables and coefficients still use (almost) all of V d / ratio."""
    from pocketformer.compress.see import SEEConfig, budget, plan_units

    loaded = load_model(tiny_bert)
    E = loaded.adapter.embeddings(loaded.model).weight.detach()
    tokens = loaded.adapter.vocabulary(loaded)
    V, d = E.shape
    dims, cfg = (2, 4, 4), SEEConfig(ratio=4, order=3)
    Ua, Ub, Uc = budget(V, d, dims, 4, cfg.rank())
    plan = plan_units(tokens, "bert", E, dims, cfg)
    assert plan.units_a < Ua                                   # A capped by the rows it clusters
    assert plan.units_b > Ub and plan.units_c > Uc             # its spare moved to B and C
    used = plan.units_a * 2 + plan.units_b * 4 + plan.units_c * 4 + V * cfg.rank()
    assert V * d / 4 - 2 * 4 <= used <= V * d / 4, (used, V * d / 4)
    assert plan.index_c is not None and int(plan.index_c.max()) < plan.units_c
    assert plan.stats["units_c"] == plan.units_c


def test_fill_rank_gives_free_slots_data_units_and_keeps_the_senses(tiny_bert):
    """fill_rank: the slots a token's senses leave free (paid for in the V x R coefficients
    either way) take its nearest data-driven A units; the knowledge terms and the budget stay."""
    from pocketformer.compress.see import SEEConfig, plan_units

    loaded = load_model(tiny_bert)
    E = loaded.adapter.embeddings(loaded.model).weight.detach()
    tokens = loaded.adapter.vocabulary(loaded)
    plain = plan_units(tokens, "bert", E, (4, 8), SEEConfig(ratio=4))
    full = plan_units(tokens, "bert", E, (4, 8), SEEConfig(ratio=4, fill_rank=True))
    assert (plain.units_a, plain.units_b) == (full.units_a, full.units_b)      # same budget
    assert bool(full.active.all()) and full.stats["mean_rank"] == 4.0
    assert full.stats["filled_terms"] == int((~plain.active).sum())
    # every term a token had keeps its unit; the added ones are data units, none repeated
    assert torch.equal(full.index_a[plain.active], plain.index_a[plain.active])
    K = plain.knowledge_units
    added = full.active & ~plain.active
    assert bool((full.index_a[added] >= K).all())
    one_sense = int((plain.active.sum(1) == 1).nonzero()[0])
    assert len(set(full.index_a[one_sense].tolist())) == 4
    assert torch.equal(full.index_b, plain.index_b)


@pytest.mark.parametrize("basis_dim", [None, 16])
def test_see_in_a_principal_basis(tiny_bert_small_vocab, tmp_path, basis_dim):
    """basis = principal: the Kronecker sum builds the table's coordinates in its top-d'
    principal directions; the basis counts in the budget, its rows start orthonormal, the
    table-space error is the coordinates' error plus the energy outside the basis, and the
    module saves, reloads and exports like the raw one."""
    loaded = load_model(tiny_bert_small_vocab)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    V, d = E.shape
    cfg = parse_params(get_method("see"), {"ratio": 4, "basis": "principal", "basis_dim": basis_dim,
                                           "reconstruct_steps": 50, "hidden_minutes": 0,
                                           "distill_minutes": 0})
    rec = run_step(loaded, "see", cfg, _calib(loaded, f"{STS_DEV}@0:0.05"))
    dt = rec["details"]
    width = basis_dim or d                                 # d x d fits 1/8 of this budget
    assert dt["basis_dim"] == width and dt["ratio"] >= 4 * 0.99
    emb = loaded.adapter.embeddings(loaded.model)
    assert isinstance(emb, EntangledEmbedding) and emb.basis.shape == (width, d)
    assert dt["params_after"] == emb.param_count() and emb.param_count() * 4 <= V * d * 1.01
    _, _, Vh = torch.linalg.svd(E.double(), full_matrices=False)
    torch.testing.assert_close(emb.basis.detach(), Vh[:width].float())       # no training ran
    rows = dt["stage1_rows"]
    energy = rows["basis_energy"]
    assert energy == pytest.approx(1.0, abs=1e-5) if width == d else 0 < energy < 1
    assert rows["relative_error"] == pytest.approx(
        rows["coordinates_relative_error"] * energy + (1 - energy), rel=1e-3)
    save_model(loaded, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["pocketformer_embedding"]["d"] == d
    again = load_model(tmp_path / "m")
    ids = again.adapter.example_inputs(again, batch=2, seq_len=12)
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*ids),
                                   loaded.adapter.export_module(loaded)(*ids))
    if basis_dim is None:
        (onnx,) = export_model(again, tmp_path / "art", ExportConfig(formats=["onnx"], seq_len=12))
        assert onnx.parity["passed"], onnx.parity


@pytest.mark.parametrize("exact_share", [0.0, 0.3])
def test_embed_svd_baseline(tiny_bert_small_vocab, tmp_path, exact_share):
    loaded = load_model(tiny_bert_small_vocab)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    cfg = parse_params(get_method("embed-svd"), {"ratio": 4, "exact_share": exact_share,
                                                 "hidden_minutes": 0, "distill_minutes": 0})
    rec = run_step(loaded, "embed-svd", cfg, _calib(loaded, f"{STS_DEV}@0:0.05"))
    assert rec["details"]["ratio"] >= 4 and 0 < rec["details"]["stage1_rows"]["relative_error"] < 1
    emb = loaded.adapter.embeddings(loaded.model)
    if exact_share:
        # the kept rows are the original ones (no training here), the rest the rank-k SVD of
        # the other rows, which the kept ones no longer pull towards themselves
        # the factors hold the other rows only: no zero row of P for each kept token
        assert isinstance(emb, ExactRows) and isinstance(emb.base, LowRankRows)
        V, dim = E.shape
        assert isinstance(emb.base.base, ZeroRows) and emb.base.rows_kept == V - emb.rows_kept
        K = emb.rows_kept
        kept = emb.slot < K
        assert K == rec["details"]["stage1_rows"]["exact_rows"] > 0
        torch.testing.assert_close(emb.weight[kept], E[kept])
        rest_err = float(((emb.weight[~kept] - E[~kept]) ** 2).sum() / (E[~kept] ** 2).sum())
        U, S, Vh = torch.linalg.svd(E[~kept].double(), full_matrices=False)
        k = emb.base.rank
        # the largest rank the budget pays for
        assert rec["details"]["params_after"] == (K + 1) * dim + (V - K + 1 + dim) * k
        assert (K + 1) * dim + (V - K + 1 + dim) * (k + 1) > V * dim / 4
        best = float((S[k:] ** 2).sum() / (S ** 2).sum())
        assert rest_err == pytest.approx(best, rel=1e-3)
    else:
        assert isinstance(emb, FactoredEmbedding)
    save_model(loaded, tmp_path / "m")
    again = load_model(tmp_path / "m")
    ids = again.adapter.example_inputs(again, batch=2, seq_len=12)
    with torch.inference_mode():
        torch.testing.assert_close(again.adapter.export_module(again)(*ids),
                                   loaded.adapter.export_module(loaded)(*ids))


@pytest.mark.parametrize("method", ["embed-svd", "see"])
def test_head_metric_fits_rows_in_the_head_input_metric(tiny_llama_2l, small_text, method):
    """head_metric on a tied decoder: embed-svd's table is the rank-k optimum in the metric
    M = (1 - beta) I + beta C d / tr C (C: the head input's second moment on the calibration
    text), closer in M than the plain SVD; SEE's stage 1a, from the same start, ends closer in
    M (its low-rank form) than the plain fit does, and reports that error."""
    from pocketformer.compress.see import head_moment, metric_from_moment, metric_lowrank, metric_root

    beta = 0.7
    loaded = load_model(tiny_llama_2l)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    calib = _calib(loaded, small_text)
    M = metric_from_moment(head_moment(loaded, calib.inputs(loaded)), beta)

    def fitted(b):
        model = load_model(tiny_llama_2l)
        params = {"ratio": 4, "head_metric": b, "hidden_minutes": 0, "distill_minutes": 0}
        if method == "see":   # the metric's algebra in the table's own coordinates
            params.update(reconstruct_steps=100, basis="raw")
        rec = run_step(model, method, parse_params(get_method(method), params), calib)
        return model.adapter.embeddings(model.model).weight.detach(), rec["details"]

    W, details = fitted(beta)
    W0, _ = fitted(0.0)
    if method == "embed-svd":
        L, _ = metric_root(M)
        in_m = lambda X: float((((X - E) @ L) ** 2).sum())
        S = torch.linalg.svd((E @ L).double(), full_matrices=False).S
        k = details["rank"]
        assert in_m(W) == pytest.approx(float((S[k:] ** 2).sum()), rel=1e-3)
        assert in_m(W) < 0.95 * in_m(W0)
        assert float(((W0 - E) ** 2).sum()) <= float(((W - E) ** 2).sum())
    else:
        c, Wm, _ = metric_lowrank(M)
        in_m = lambda X: float(c * ((X - E) ** 2).sum() + (((X - E) @ Wm) ** 2).sum())
        rows = details["stage1_rows"]
        assert rows["head_metric"] == beta and rows["metric_rank"] == Wm.shape[1]
        assert rows["weighted_relative_error"] == pytest.approx(in_m(W) / in_m(torch.zeros_like(E)),
                                                                rel=1e-3)
        assert in_m(W) < in_m(W0)


def test_input_moment_estimates_the_jacobian_second_moment(tiny_bert_small_vocab):
    """input_moment's Gaussian probes estimate E[J^T J], J the Jacobian of the sentence embedding
    with respect to the token table's output at a position: on one batch probed many times it
    comes close to the exact one, and padding positions add nothing."""
    from pocketformer.compress.see import input_moment

    loaded = load_model(tiny_bert_small_vocab)
    ids, mask = loaded.adapter.example_inputs(loaded, batch=2, seq_len=12)
    batch = (ids, mask)
    module = loaded.adapter.export_module(loaded)
    x0 = loaded.adapter.embeddings(loaded.model)(ids).detach()

    def out_of(x):
        hidden = loaded.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return loaded.adapter.output_features(loaded, hidden, batch)

    J = torch.autograd.functional.jacobian(out_of, x0)           # [2, d, 2, 12, d]
    d = x0.shape[-1]
    Jp = J.permute(2, 3, 0, 1, 4).reshape(2 * 12, 2 * d, d)       # per position: output x input
    assert float(Jp.reshape(2, 12, 2 * d, d)[mask == 0].abs().max()) == 0.0
    exact = torch.einsum("pod,poe->de", Jp.double(), Jp.double()) / Jp.shape[0]
    probes = 2400
    est = input_moment(loaded, [batch] * probes, seed=0, max_batches=probes).double()
    assert float((est - exact).norm() / exact.norm()) < 0.12
    assert not loaded.adapter.embeddings(loaded.model)._forward_hooks   # the probe's hook is gone
    with torch.no_grad():
        assert not module(*batch).requires_grad


@pytest.mark.parametrize("method", ["embed-svd", "see"])
def test_input_metric_fits_rows_in_the_input_metric(tiny_bert_small_vocab, small_text, method):
    """input_metric: embed-svd's table is the rank-k optimum in M = (1 - beta) I + beta C d / tr C
    (C: input_moment on the calibration text); SEE's principal basis is whitened in M (P M P^T =
    I), so its coordinates' fit is a fit in M: its rows end closer in M than the plain fit's, and
    the record gives that error."""
    from pocketformer.compress.see import input_moment, metric_from_moment, metric_root

    beta = 0.7               # below 1: M >= 0.3 I, so L L^T = M exactly (no floored direction)
    loaded = load_model(tiny_bert_small_vocab)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    calib = _calib(loaded, small_text)
    M = metric_from_moment(input_moment(loaded, calib.inputs(loaded), seed=0), beta)
    L, _ = metric_root(M)
    in_m = lambda X: float((((X - E) @ L) ** 2).sum())

    def fitted(b):
        model = load_model(tiny_bert_small_vocab)
        params = {"ratio": 8, "input_metric": b, "hidden_minutes": 0, "distill_minutes": 0}
        if method == "see":
            params.update(ratio=4, reconstruct_steps=100)
        rec = run_step(model, method, parse_params(get_method(method), params), calib)
        emb = model.adapter.embeddings(model.model)
        return emb.weight.detach(), {**rec["details"], "module": emb}

    W, details = fitted(beta)
    W0, _ = fitted(0.0)
    assert in_m(W) < 0.95 * in_m(W0)
    assert float(((W0 - E) ** 2).sum()) < float(((W - E) ** 2).sum())
    if method == "embed-svd":
        S = torch.linalg.svd((E @ L).double(), full_matrices=False).S
        assert in_m(W) == pytest.approx(float((S[details["rank"]:] ** 2).sum()), rel=1e-3)
        assert details["stage1_rows"]["input_metric"] == beta
    else:
        rows = details["stage1_rows"]
        assert rows["input_metric"] == beta
        assert rows["input_metric_relative_error"] == pytest.approx(in_m(W) / in_m(torch.zeros_like(E)),
                                                                    rel=1e-3)
        P = details["module"].basis.detach().double()
        torch.testing.assert_close(P @ M.double() @ P.T, torch.eye(P.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-3)


def test_see_head_metric_whitens_a_principal_basis_fitted_to_the_other_rows(tiny_llama_2l, small_text):
    """head_metric with the principal basis (and exact rows): the basis is whitened in the head's
    metric M (P M P^T = I) and spans the top directions of the rows the Kronecker sum fits (the
    ones without exact rows), in M; the fit ends closer in M than the plain one, and the record
    gives that error."""
    from pocketformer.compress.see import head_moment, metric_from_moment, metric_root

    beta = 0.7
    loaded = load_model(tiny_llama_2l)
    E = loaded.adapter.embeddings(loaded.model).weight.detach().clone()
    calib = _calib(loaded, small_text)
    M = metric_from_moment(head_moment(loaded, calib.inputs(loaded)), beta)
    L, _ = metric_root(M)
    in_m = lambda X: float((((X - E) @ L) ** 2).sum())

    def fitted(b):
        model = load_model(tiny_llama_2l)
        params = {"ratio": 4, "head_metric": b, "exact_share": 0.3, "reconstruct_steps": 100,
                  "hidden_minutes": 0, "distill_minutes": 0}
        rec = run_step(model, "see", parse_params(get_method("see"), params), calib)
        return model.adapter.embeddings(model.model), rec["details"]

    module, details = fitted(beta)
    module0, _ = fitted(0.0)
    rest = module.slot == module.rows_kept
    assert 0 < int((~rest).sum()) < E.shape[0]
    W, W0 = module.weight.detach(), module0.weight.detach()
    assert in_m(W) < in_m(W0)
    rows = details["stage1_rows"]
    assert rows["head_metric"] == beta and "metric_rank" not in rows
    base = module.base.weight.detach()     # the record measures the Kronecker part on every row
    assert rows["head_metric_relative_error"] == pytest.approx(in_m(base) / in_m(torch.zeros_like(E)),
                                                               rel=1e-3)
    P = module.base.basis.detach().double()
    torch.testing.assert_close(P @ M.double() @ P.T, torch.eye(P.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-3)
    # P L spans the top right singular vectors of (E L) on the fitted rows
    PL = P @ L.double()
    _, _, Vh = torch.linalg.svd((E @ L)[rest].double(), full_matrices=False)
    Vh = Vh[:P.shape[0]]
    torch.testing.assert_close(PL.T @ PL, Vh.T @ Vh, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_llama_2l"])
def test_stage2_hidden_weight_adds_the_hidden_state_loss(family, request, small_text):
    """distill_hidden_weight w: stage 2's objective is the output loss plus w x stage 1b's
    last-hidden-state loss (measured with lr 0 on one batch, so every step sees the same model)."""
    from pocketformer.compress.see import _train_against_teacher

    data = small_text if family == "tiny_llama_2l" else f"{STS_DEV}@0:0.05"
    loaded, teacher, _, batches, groups = _student_off_its_teacher(request.getfixturevalue(family), data)

    def first_loss(kind, w=0.0):
        rec = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, kind, "t",
                                     hidden_weight=w)
        assert rec["steps"] >= 1
        return rec["loss_first"]

    hidden, output = first_loss("hidden"), first_loss("output")
    assert hidden > 0 and output > 0
    assert first_loss("output", 2.0) == pytest.approx(output + 2.0 * hidden, rel=1e-4)


def test_stage2_relation_weight_adds_the_cosine_matrix_loss(tiny_bert, tiny_llama_2l, small_text, tmp_path,
                                                          capsys):
    """distill_relation_weight w: stage 2's objective is 1 - cos plus w x `relation_loss`, which
    is 0 for embeddings that keep every pairwise cosine (rotated and rescaled rows) and not for
    ones that move them; a decoder refuses the option before any work (exit 2)."""
    from pocketformer.compress.see import _train_against_teacher, relation_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert relation_loss(3.0 * t @ q, t).item() < 1e-10
    assert relation_loss(t + 0.5 * torch.randn(8, 16, generator=g), t).item() > 1e-3
    swapped = t.clone()
    swapped[[0, 1]] = t[[1, 0]]
    assert relation_loss(swapped, t).item() > 1e-3

    loaded, teacher, _, batches, groups = _student_off_its_teacher(tiny_bert, f"{STS_DEV}@0:0.05")
    with torch.no_grad():
        module = loaded.adapter.export_module(loaded)
        rel = relation_loss(module(*batches[0]), teacher.adapter.export_module(teacher)(*batches[0])).item()
    assert rel > 0

    def first_loss(w):
        rec = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, "output", "t",
                                     relation_weight=w)
        assert rec["steps"] >= 1
        return rec["loss_first"]

    assert first_loss(5.0) == pytest.approx(first_loss(0.0) + 5.0 * rel, rel=1e-4)
    code = main(["compress", "--model", str(tiny_llama_2l), "--method", "see", "--distill-relation-weight",
                 "1", "--calibration", str(small_text), "--out", str(tmp_path / "o")])
    assert code == 2 and "distill_relation_weight" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stage2_ce_weight_adds_the_next_token_loss(tiny_llama_2l, tiny_bert, small_text, tmp_path,
                                                  capsys):
    """distill_ce_weight w (decoders): stage 2's objective is the KL plus w x the next-token
    cross-entropy on the batch's own text, recorded apart; adapt_dense trains the unfactored
    model with that loss and lowers it on the calibration text; an encoder refuses the option
    before any work (exit 2)."""
    from pocketformer.compress.see import EmbedSVDConfig, _train_against_teacher, adapt_dense

    loaded, teacher, calib, batches, groups = _student_off_its_teacher(tiny_llama_2l, small_text)
    with torch.no_grad():
        logits = loaded.adapter.export_module(loaded)(*batches[0]).float()
    ids = batches[0][0]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1)).item()

    def first(w):
        rec = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, "output", "t",
                                     ce_weight=w)
        assert rec["steps"] >= 1
        return rec

    plain, with_ce = first(0.0), first(1.5)
    assert "ce_first" not in plain
    assert with_ce["ce_first"] == pytest.approx(ce, rel=1e-4)
    assert with_ce["loss_first"] == pytest.approx(plain["loss_first"] + 1.5 * ce, rel=1e-4)

    fresh = load_model(tiny_llama_2l)
    before = [p.detach().clone() for p in fresh.model.parameters()]
    cfg = EmbedSVDConfig(hidden_minutes=0.0, distill_minutes=0.1, distill_ce_weight=1.0,
                         scope_lr=1e-2)
    rec = adapt_dense(fresh, cfg, calib)
    assert rec["steps"] >= 10 and rec["ce_last"] < rec["ce_first"]
    assert all(not p.requires_grad for p in fresh.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))

    code = main(["compress", "--model", str(tiny_bert), "--method", "see", "--distill-ce-weight",
                 "1", "--calibration", f"{STS_DEV}@0:0.05", "--out", str(tmp_path / "o")])
    assert code == 2 and "distill_ce_weight" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_llama_2l"])
def test_bf16_stages_train_fp32_parameters_on_a_bf16_forward(family, request, small_text):
    """precision = bf16: the student of stages 1b and 2 runs under CPU bf16 autocast, so each
    stage's first loss is the fp32 one up to bf16 rounding (the same objective), it trains, the
    parameters stay fp32 and the record names the precision."""
    from pocketformer.compress.see import _train_against_teacher

    path = request.getfixturevalue(family)
    data = small_text if family == "tiny_llama_2l" else f"{STS_DEV}@0:0.05"
    first = {}
    for precision in ("fp32", "bf16"):
        for kind in ("hidden", "output"):      # each from the same student
            loaded = load_model(path)
            batches = _calib(loaded, data).inputs(loaded)[:2]
            teacher = loaded.clone()
            emb = loaded.adapter.embeddings(loaded.model)
            torch.manual_seed(0)
            with torch.no_grad():      # a student that differs from its teacher
                emb.weight.add_(0.5 * torch.randn_like(emb.weight))
            before = emb.weight.detach().clone()
            groups = [{"params": list(emb.parameters()), "lr": 1e-2}]
            rec = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, kind, "t",
                                         precision=precision)
            assert rec["precision"] == precision and rec["steps"] >= 1
            first[precision, kind] = rec["loss_step1"]
            assert not torch.equal(emb.weight, before)                    # it trained
            assert all(q.dtype == torch.float32 for q in loaded.model.parameters())
    for kind in ("hidden", "output"):
        assert first["bf16", kind] == pytest.approx(first["fp32", kind], rel=5e-2)
        assert first["bf16", kind] != first["fp32", kind]                  # it did run in bf16


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (run on a GPU machine; CI has none)")
@pytest.mark.parametrize("method", ["see", "embed-svd"])
def test_stages_on_cuda_start_from_the_cpu_loss_and_come_back(tiny_llama_2l, small_text, method):
    """device = cuda: the head metric's pass and stages 1b and 2 run on the GPU, the rest on the
    CPU, so stage 1a's fit (in the metric) and stage 1b's first loss are the CPU run's (fp32, up
    to kernel rounding); the student trains there, comes back to the CPU, and the record names
    the device."""
    first, tables, fit = {}, {}, {}
    for device, budget in (("cpu", 0.0), ("cpu", FAST["distill_minutes"]),
                           ("cuda", FAST["distill_minutes"])):
        loaded = load_model(tiny_llama_2l)
        params = {"ratio": 4, "device": device, "row_anchor": 0.5, "head_metric": 1.0,
                  "hidden_minutes": budget, "distill_minutes": budget}
        if method == "see":
            params["reconstruct_steps"] = 50
        rec = run_step(loaded, method, parse_params(get_method(method), params),
                       _calib(loaded, small_text))["details"]
        tables[device, budget] = loaded.adapter.embeddings(loaded.model).weight.detach()
        fit[device] = rec["stage1_rows"]["relative_error"]
        assert {t.device.type for t in [*loaded.model.parameters(), *loaded.model.buffers()]} == {"cpu"}
        if budget == 0:
            continue
        for stage in ("stage1_hidden", "stage2_distill"):
            assert rec[stage]["steps"] >= 1
            assert rec[stage]["device"].startswith(device)
            first[device, stage] = rec[stage]["loss_step1"]
    assert fit["cuda"] == pytest.approx(fit["cpu"], rel=1e-3)
    assert first["cuda", "stage1_hidden"] == pytest.approx(first["cpu", "stage1_hidden"], rel=1e-2)
    assert not torch.equal(tables["cuda", FAST["distill_minutes"]], tables["cpu", 0.0])   # trained


def test_row_anchor_adds_the_whole_vocabulary_row_error(tiny_bert_small_vocab):
    """row_anchor w: stages 1b and 2 add w x the relative error of rows drawn from the whole
    vocabulary (all of them here: anchor_rows >= V), against the original table; the record
    reports that error; a run with the anchor ends closer to the original rows."""
    from pocketformer.compress.see import RowAnchor, _train_against_teacher

    loaded = load_model(tiny_bert_small_vocab)
    batches = _calib(loaded, f"{STS_DEV}@0:0.05").inputs(loaded)[:1]
    teacher = loaded.clone()
    emb = loaded.adapter.embeddings(loaded.model)
    E = emb.weight.detach().clone()
    with torch.no_grad():
        emb.weight.add_(0.5 * torch.randn_like(emb.weight))
    rel = float(((emb.weight - E) ** 2).sum() / (E ** 2).sum())
    groups = [{"params": list(emb.parameters()), "lr": 0.0}]
    plain = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, "output", "t")
    anchored = _train_against_teacher(loaded, teacher, groups, batches, 0.02, 0, "output", "t",
                                      anchor=RowAnchor(emb, E, 2.0, 10 ** 6, 0))
    assert anchored["loss_first"] == pytest.approx(plain["loss_first"] + 2.0 * rel, rel=1e-4)
    assert anchored["anchor_rows_error_first"] == pytest.approx(rel, rel=1e-4)
    assert "anchor_rows_error_first" not in plain

    def trained(w):
        m = load_model(tiny_bert_small_vocab)
        cfg = parse_params(get_method("embed-svd"), {"ratio": 4, **FAST, "row_anchor": w,
                                                     "distill_lr": 3e-2})
        run_step(m, "embed-svd", cfg, _calib(m, f"{STS_DEV}@0:0.05"))
        W = m.adapter.embeddings(m.model).weight
        return float(((W - E) ** 2).sum() / (E ** 2).sum())

    assert trained(10.0) < trained(0.0)


@pytest.mark.parametrize("method, scope", [("see", "embedding"), ("see", "norms"), ("see", "all"),
                                           ("embed-svd", "all")])
def test_train_scope_decides_what_moves_beside_the_table(method, scope, tiny_bert_small_vocab):
    """train_scope: stages 1b and 2 train the new table alone, plus every norm's gain and bias,
    or plus every other weight; what is outside the scope is bit-identical afterwards."""
    loaded = load_model(tiny_bert_small_vocab)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()
              if "word_embeddings" not in n}
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters() if n in before}
    opts = {"ratio": 4, **FAST, "train_scope": scope, "scope_lr": 1e-2}
    cfg = parse_params(get_method(method), {**opts, "reconstruct_steps": 5} if method == "see" else opts)
    rec = run_step(loaded, method, cfg, _calib(loaded, f"{STS_DEV}@0:0.05"))
    assert rec["details"]["stage2_distill"]["steps"] >= 1
    after = dict(loaded.model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n])}
    norms = {n for n in before if "LayerNorm" in n}
    in_scope = {"embedding": set(), "norms": norms, "all": set(before)}[scope]
    # BERT's pooler is not on the mean-pooled sentence embedding's path: no gradient, no move
    assert moved == {n for n in in_scope if not n.startswith("pooler.")}, sorted(moved ^ in_scope)[:5]
    extra = rec["details"]["train_scope"]["extra_params_trained"]
    assert extra == sum(before[n].numel() for n in in_scope)
    assert {n: p.requires_grad for n, p in after.items() if n in before} == flags
    assert not any(p.requires_grad for n, p in after.items() if n not in before)   # the new table


@pytest.mark.parametrize("args, words", [
    (["--ratio", "100000"], "cannot be met"),
    (["--d1", "7"], "d1"),
    (["--order", "4"], "order 2"),
    (["--order", "3", "--basis-dim", "14"], "three factors"),
    (["--order", "3", "--d1", "5"], "does not divide"),
    (["--inventory", "hownet"], "wordnet"),
    (["--exact-share", "1.5"], "exact_share"),
    (["--ratio", "50000", "--exact-share", "0.5"], "buys no"),
    (["--tier-share", "1.5"], "tier_share"),
    (["--exact-share", "0.6", "--tier-share", "0.5"], "must be below 1"),
    (["--tier-share", "0.3", "--tier-rank", "0"], "tier_rank"),
    (["--tier-share", "0.3", "--tier-rank", "32"], "below the embedding width 32"),
    (["--ratio", "50000", "--tier-share", "0.5", "--tier-rank", "4"], "buys no rank-4 row"),
    (["--head-metric", "1.5"], "head_metric"),
    (["--head-metric", "0.5"], "tied LM head"),
    (["--input-metric", "1.5"], "input_metric"),
    (["--input-metric", "0.5", "--basis", "raw"], "basis = principal"),
    (["--input-metric", "0.5", "--head-metric", "0.5"], "not both"),
    (["--input-metric", "0.5", "--input-metric-batches", "0"], "input_metric_batches"),
    (["--head-metric", "0.5", "--head-metric-batches", "0"], "head_metric_batches"),
    (["--basis", "pca"], "principal"),
    (["--basis", "raw", "--basis-dim", "16"], "basis = principal"),
    (["--basis", "principal", "--basis-dim", "33"], "at most the embedding width"),
    (["--distill-hidden-weight", "-1"], "distill_hidden_weight"),
    (["--distill-relation-weight", "-1"], "distill_relation_weight"),
    (["--distill-ce-weight", "-1"], "distill_ce_weight"),
    (["--max-passes", "0"], "max_passes"),
    (["--train-scope", "layers"], "train_scope"),
    (["--row-anchor", "-0.5"], "row_anchor"),
    (["--row-anchor", "1", "--anchor-rows", "0"], "anchor_rows"),
    (["--train-scope", "all", "--scope-lr", "0"], "scope_lr"),
    (["--precision", "fp16"], "precision"),
    (["--reassign-rounds", "21"], "reassign_rounds"),
    (["--knowledge-role", "always"], "knowledge_role"),
    (["--teacher", "dense"], "teacher"),
    (["--device", "tpu"], "cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason="a CUDA device is visible here, so cuda is valid")),
])
def test_see_bad_input_exit_2(tiny_bert, tmp_path, capsys, args, words):
    code = main(["compress", "--model", str(tiny_bert), "--method", "see", *args,
                 "--calibration", f"{STS_DEV}@0:0.05", "--out", str(tmp_path / "o")])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_factored_head_many_positions_same_values_and_gradients():
    """Many positions at once (training, scoring) take the assembled table in eager mode; values
    and gradients are those of the factored contraction, which one position still uses."""
    g = torch.Generator().manual_seed(0)
    V, R, ua, ub = 300, 3, 40, 30
    emb = EntangledEmbedding(torch.randn(ua, 4, generator=g), torch.randn(ub, 6, generator=g),
                             torch.randint(0, ua, (V, R), generator=g),
                             torch.randint(0, ub, (V, R), generator=g), torch.randn(V, R, generator=g))
    # 74 positions: the factored intermediate (74 x V R d_small) exceeds the V x d table
    assert 74 * emb.intermediate_per_position() > V * 24 > emb.intermediate_per_position()
    h = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    params = (h, emb.table_a, emb.table_b, emb.coef)
    emb._logits(h).square().mean().backward()
    want = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    got = emb.logits(h)
    torch.testing.assert_close(got, emb._logits(h))
    got.square().mean().backward()
    for t, w in zip(params, want):
        torch.testing.assert_close(t.grad, w)


def _bmm_right_shapes(program) -> list[tuple[int, ...]]:
    """The right-hand sides' shapes of an exported program's batched matmuls."""
    return [tuple(n.args[1].meta["val"].shape) for n in program.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.bmm.default]


def test_exported_head_over_a_dynamic_number_of_positions_assembles_the_coordinates(tmp_path):
    """An exported head whose position count is a dynamic dimension (a scoring program)
    multiplies by the V x d' coordinate table; a head exported at one fixed position (a decode
    step) runs the factored contraction; both equal the dense product."""
    g = torch.Generator().manual_seed(1)
    V, R, ua, ub, d = 300, 2, 40, 30, 32
    emb = EntangledEmbedding(torch.randn(ua, 4, generator=g), torch.randn(ub, 5, generator=g),
                             torch.randint(0, ua, (V, R), generator=g),
                             torch.randint(0, ub, (V, R), generator=g), torch.randn(V, R, generator=g),
                             basis=torch.linalg.qr(torch.randn(d, 20, generator=g))[0].T)
    head = EntangledHead(emb).eval()
    h = torch.randn(1, 6, d, generator=g)
    want = h @ emb.weight.T
    seq = torch.export.Dim("seq", min=1, max=64)
    dynamic = torch.export.export(head, (h,), dynamic_shapes=({1: seq},), strict=False)
    assert (1, 20, V) in _bmm_right_shapes(dynamic)                      # (h basis^T) coords^T
    for n in (1, 6, 40):
        x = torch.randn(1, n, d, generator=g)
        torch.testing.assert_close(dynamic.module()(x), x @ emb.weight.T, rtol=1e-4, atol=1e-4)
    one = torch.export.export(head, (h[:, -1:],), strict=False)
    assert (1, 20, V) not in _bmm_right_shapes(one)
    torch.testing.assert_close(one.module()(h[:, -1:]), want[:, -1:], rtol=1e-4, atol=1e-4)
    # the ONNX file stores the factors, not their product: onnxslim may fold no constant larger
    # than the largest stored tensor (here the V x d' table, 24 kB, would be the largest)
    import onnx
    from pocketformer.export.exporters import export_onnx
    path = tmp_path / "head.onnx"
    export_onnx(head, (h,), path, ExportConfig(formats=["onnx"]), input_names=["hidden"],
                output_names=["logits"], dynamic_shapes=({1: seq},), dynamic_axes_doc={})
    stored = max(t.numel() * t.element_size() for t in head.state_dict().values())
    sizes = [onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer]
    assert V * 20 * 4 > stored >= max(sizes), (stored, sizes)


def test_head_moment_is_the_second_moment_of_the_final_normed_hidden_states(tiny_llama_2l, small_text):
    """head_moment stops each pass after the last layer; its C must still be E[h h^T] of what
    the LM head reads, here taken from the full model's own final-normed output."""
    from pocketformer.compress.see import head_moment

    loaded = load_model(tiny_llama_2l)
    batches = _calib(loaded, small_text).inputs(loaded)
    C = head_moment(loaded, batches)
    with torch.no_grad():
        hs = [loaded.model.model(input_ids=b[0]).last_hidden_state.reshape(-1, C.shape[0]).double()
              for b in batches]
    h = torch.cat(hs)
    want = (h.T @ h / h.shape[0]).float()
    assert torch.allclose(C, want, rtol=1e-4, atol=1e-6), float((C - want).abs().max())
    # the hook is gone and the model still returns logits
    assert loaded.model(input_ids=batches[0][0]).logits.shape[-1] == loaded.model.config.vocab_size


def test_head_metric_batches_measures_the_moment_on_evenly_spaced_batches(tiny_llama_2l, small_text):
    """head_metric_batches = k: the metric is the one measured on k of the calibration batches,
    the first, the last and evenly spaced between, not on the first k."""
    from pocketformer.compress.see import head_moment, metric_from_moment, row_metric

    loaded = load_model(tiny_llama_2l)
    batches = _calib(loaded, small_text).inputs(loaded)
    n = len(batches)
    assert n >= 4, n
    for k in (2, 3):
        want = [batches[round(i * (n - 1) / (k - 1))] for i in range(k)]
        got = row_metric(loaded, batches, 0.5, max_batches=k)
        torch.testing.assert_close(got, metric_from_moment(head_moment(loaded, want), 0.5))
        assert not torch.allclose(got, row_metric(loaded, batches[:k], 0.5))
    # at least as many as there are: every batch
    torch.testing.assert_close(row_metric(loaded, batches, 0.5, max_batches=n + 5),
                               row_metric(loaded, batches, 0.5))


def test_teacher_original_distils_from_the_recipe_s_model_before_its_first_step(tiny_llama_2l,
                                                                                 small_text):
    """teacher = original: stages 1b and 2 read the model the recipe started from
    (Calibration.original), kept as it is; without one (a single step), or with teacher =
    incoming, a copy of the model as the step receives it. A model whose token table differs
    cannot be the teacher."""
    from pocketformer.compress.see import SEEConfig, _choose_teacher
    from pocketformer.errors import BadInputError

    original = load_model(tiny_llama_2l)
    loaded = original.clone()
    loaded.adapter.keep_layers(loaded.model, [0])          # an earlier step removed a layer
    E = loaded.model.get_input_embeddings().weight.detach().clone()
    calib = _calib(loaded, small_text)
    want = SEEConfig(teacher="original")
    alone, which = _choose_teacher(loaded, E, want, calib)           # no original: alone
    assert which == "incoming" and alone.model is not loaded.model
    assert len(alone.adapter.layers(alone.model)) == 1
    calib.original = original
    teacher, which = _choose_teacher(loaded, E, want, calib)
    assert which == "original" and teacher is original
    assert len(teacher.adapter.layers(teacher.model)) == 2
    _, which = _choose_teacher(loaded, E, SEEConfig(teacher="incoming"), calib)
    assert which == "incoming"
    with pytest.raises(BadInputError) as exc:
        _choose_teacher(loaded, E[:-1], want, calib)
    assert exc.value.field == "teacher"
    # the step records which teacher it distilled from; the original stays as it was
    before = {k: v.clone() for k, v in original.model.state_dict().items()}
    details = run_step(loaded, "see", parse_params(get_method("see"), {
        "ratio": 4, "reconstruct_steps": 20, "teacher": "original", **FAST}), calib)["details"]
    assert details["teacher"] == "original"
    after = original.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_bool_option_that_is_not_true_or_false_exits_2(tiny_bert, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:           # argparse's own exit for a bad value
        main(["compress", "--model", str(tiny_bert), "--method", "see", "--fill-rank", "maybe",
              "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--fill-rank: expected true or false, got 'maybe'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_reassign_rounds_choose_units_by_the_fit_in_stage_1a(tiny_bert_small_vocab):
    """reassign_rounds: after stage 1a's sweeps, each round re-chooses the terms' units by the
    fit and sweeps three more times; the record lists the moves, the error only falls through
    the rounds, and the rows end closer to the table than the same sweeps without the rounds."""
    errors = {}
    for rounds in (0, 2):
        loaded = load_model(tiny_bert_small_vocab)
        cfg = parse_params(get_method("see"), {"ratio": 4, "max_rank": 2, "reassign_rounds": rounds,
                                               "reconstruct_steps": 0, "hidden_minutes": 0,
                                               "distill_minutes": 0})
        rows = run_step(loaded, "see", cfg, _calib(loaded, f"{STS_DEV}@0:0.05"))["details"]["stage1_rows"]
        errors[rounds] = rows["als_errors"]
        if rounds:
            assert len(rows["reassigned_terms"]) == rounds and min(rows["reassigned_terms"]) > 0
            assert len(rows["als_errors"]) == 10 + 3 * rounds
        else:
            assert "reassigned_terms" not in rows
    e = errors[2]
    assert all(b <= a + 1e-4 for a, b in zip(e, e[1:])), e
    assert e[-1] < errors[0][-1] - 0.01, (e, errors[0])


def test_knowledge_role_init_lets_the_rounds_move_wordnet_terms(tiny_bert_small_vocab):
    """knowledge_role: fixed keeps every WordNet term on its sense's unit through the rounds, so
    as many terms point at WordNet units as the plan gave; init (the default) lets the rounds
    move any A unit to any unit, so that count changes and more units move."""
    seen = {}
    for role, rounds in (("fixed", 0), ("fixed", 1), ("init", 1)):
        m = load_model(tiny_bert_small_vocab)
        cfg = parse_params(get_method("see"), {"ratio": 4, "max_rank": 2, "reassign_rounds": rounds,
                                               "knowledge_role": role, "reconstruct_steps": 0,
                                               "hidden_minutes": 0, "distill_minutes": 0})
        details = run_step(m, "see", cfg, _calib(m, f"{STS_DEV}@0:0.05"))["details"]
        K = details["plan"]["knowledge_units"]
        assert K > 0
        emb = m.adapter.embeddings(m.model)        # inactive slots hold unit 0 in every run
        seen[role, rounds] = (int((emb.index_a < K).sum()), details["stage1_rows"])
    planned = seen["fixed", 0][0]
    assert seen["fixed", 1][0] == planned
    assert seen["init", 1][0] != planned
    assert seen["init", 1][1]["reassigned_terms"][0] > seen["fixed", 1][1]["reassigned_terms"][0]


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_llama_2l"])
def test_teacher_replay_gives_the_live_teacher_s_outputs_without_running_it_again(family, request,
                                                                                 small_text):
    """TeacherReplay: the first call on a batch runs the teacher; a later one runs no teacher
    forward and returns the same output and last-layer output (an encoder's embedding kept, a
    decoder's logits replayed through its final norm and head). No room, or a replay that fails
    its check, means every call runs live and still returns the live outputs."""
    from pocketformer.compress.recovery import TeacherReplay

    path = request.getfixturevalue(family)
    loaded = load_model(path)
    data = small_text if family == "tiny_llama_2l" else f"{STS_DEV}@0:0.05"
    batches = _calib(loaded, data).inputs(loaded)[:3]
    module = loaded.adapter.export_module(loaded)
    last = loaded.adapter.layers(loaded.model)[-1]
    store = {}
    hook = last.register_forward_hook(lambda m, a, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        live = []
        for b in batches:
            out = module(*b)
            live.append((out, store["h"].clone()))
    hook.remove()
    calls = []
    loaded.model.register_forward_pre_hook(lambda m, a: calls.append(1))

    def check(replay, passes):
        for _ in range(passes):
            for i, b in enumerate(batches):
                out, hidden = replay(i, b)
                torch.testing.assert_close(out, live[i][0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(hidden, live[i][1], rtol=0, atol=0)

    replay = TeacherReplay(loaded)
    check(replay, 2)
    assert len(calls) == 3 and replay.live == 3 and replay.replayed == 3
    assert replay.record()["batches_kept"] == 3 and replay.bytes > 0
    decoder = family == "tiny_llama_2l"
    assert all((kept[1] is None) == decoder for kept in replay.kept.values())
    assert replay.head_replays is (True if decoder else None)
    out, hidden = replay(0, batches[0], need_output=False)
    assert (out is None) == decoder and len(calls) == 3
    calls.clear()
    check(TeacherReplay(loaded, room=0), 2)
    assert len(calls) == 6
    if decoder:
        calls.clear()
        strict = TeacherReplay(loaded)
        strict.TOLERANCE = -1.0             # no replay can pass: the decoder's logits run live
        check(strict, 2)
        assert len(calls) == 6 and strict.head_replays is False and not strict.kept


def test_see_stages_run_the_teacher_once_per_batch(tiny_llama_2l, small_text):
    """Stages 1b and 2 share one TeacherReplay: over both stages every calibration batch runs
    the teacher once and every other step replays it; each stage's record counts both."""
    loaded = load_model(tiny_llama_2l)
    calib = Calibration(load_for("text", DataSpec.parse(small_text)), seq_len=32, max_samples=8,
                        batch_size=4)
    n = len(calib.inputs(loaded))
    cfg = parse_params(get_method("see"), {"ratio": 4, "reconstruct_steps": 5,
                                           "hidden_minutes": 0.02, "distill_minutes": 0.03})
    d = run_step(loaded, "see", cfg, calib)["details"]
    one, two = d["stage1_hidden"], d["stage2_distill"]
    assert one["steps"] + two["steps"] > 2 * n
    assert one["teacher_forwards"] + two["teacher_forwards"] == n
    for rec in (one, two):
        assert rec["teacher_forwards"] + rec["teacher_replays"] == rec["steps"]
    assert d["teacher_replay"]["live"] == n and d["teacher_replay"]["batches_kept"] == n
    assert d["teacher_replay"]["replayed"] == one["steps"] + two["steps"] - n


def test_max_passes_ends_each_stage_after_its_passes_and_repeats(tiny_llama_2l, small_text):
    """max_passes P with minutes to spare: stages 1b and 2 each stop after ceil(P x batches)
    steps (stopped by passes, not time), the learning rate decays over those steps, and two
    runs give the same table up to float rounding: the result does not depend on the machine's
    speed. (Not to the bit: the schedule follows whichever of time and steps is further along,
    and at step 0, before any step, that is the clock's few microseconds.)"""
    from pocketformer.compress.see import EmbedSVDConfig, adapt_dense

    calib = Calibration(load_for("text", DataSpec.parse(small_text)), seq_len=32, max_samples=8,
                        batch_size=4)
    tables = []
    for _ in range(2):
        loaded = load_model(tiny_llama_2l)
        n = len(calib.inputs(loaded))
        cfg = parse_params(get_method("see"), {"ratio": 4, "reconstruct_steps": 5, "max_passes": 1.5,
                                               "hidden_minutes": 5, "distill_minutes": 5})
        d = run_step(loaded, "see", cfg, calib)["details"]
        for rec in (d["stage1_hidden"], d["stage2_distill"]):
            assert rec["steps"] == rec["max_steps"] == math.ceil(1.5 * n), rec
            assert rec["stopped_by"] == "passes" and rec["seconds"] < 60, rec
        tables.append([t.detach().clone() for t in loaded.adapter.embeddings(loaded.model).parameters()])
    for a, b in zip(*tables):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # dense-adapted: stage 1b's passes go to its one stage, as its minutes do
    loaded = load_model(tiny_llama_2l)
    cfg = EmbedSVDConfig(hidden_minutes=5, distill_minutes=5, distill_ce_weight=1.0, max_passes=0.5)
    rec = adapt_dense(loaded, cfg, calib)
    assert rec["steps"] == rec["max_steps"] == math.ceil(2 * 0.5 * n) and rec["stopped_by"] == "passes"


def test_see_ratios_benchmark_rows_with_the_next_token_loss_and_the_dense_reference(tiny_llama_2l,
                                                                                   small_text,
                                                                                   tmp_path):
    """benchmarks/see_ratios.py with --distill-ce-weight: the SVD baseline's row records the
    next-token loss, the dense-adapted row is the unfactored model after the same stage 2, and
    the JSON holds every row; an unknown method name is refused (exit 2)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "see_ratios.py"
    out = tmp_path / "rows.json"
    args = [sys.executable, str(script), "--model", str(tiny_llama_2l), "--ratios", "4",
            "--calibration", f"{small_text}@0:0.5", "--evaluation", f"{small_text}@0.5:1",
            "--seq-len", "32", "--samples", "16", "--batch-size", "4", "--hidden-minutes", "0.01",
            "--distill-minutes", "0.02", "--eval-max-windows", "4", "--distill-ce-weight", "1",
            "--train-scope", "all"]
    run = subprocess.run([*args, "--methods", "svd,dense-adapted", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "svd", "dense-adapted"}
    assert rows["svd"]["stage2_steps"] >= 1 and rows["svd"]["stage2_ce_first"] > 0
    assert rows["svd"]["achieved_ratio"] >= 3.9
    adapted = rows["dense-adapted"]
    assert adapted["stage2_steps"] >= 1 and adapted["stage2_ce_first"] > 0
    assert set(adapted) >= set(rows["svd"]) - {"factors", "row_error"}   # the same columns
    assert adapted["embedding_params"] == rows["dense"]["embedding_params"]
    assert adapted["quality"] != rows["dense"]["quality"]
    bad = subprocess.run([*args, "--methods", "svd,densee"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "densee" in bad.stderr
