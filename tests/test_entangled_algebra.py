"""Exact algebra of the entangled (Kronecker) embedding on small shapes."""
from __future__ import annotations

import copy

import pytest
import torch

from pocketformer.models.factored import EntangledEmbedding, EntangledHead, factor_dim


def _random(V=11, R=3, Ua=5, Ub=4, d1=3, d2=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EntangledEmbedding(torch.randn(Ua, d1, generator=g), torch.randn(Ub, d2, generator=g),
                              torch.randint(0, Ua, (V, R), generator=g),
                              torch.randint(0, Ub, (V, R), generator=g), torch.randn(V, R, generator=g))


def test_rows_are_sums_of_kronecker_products():
    emb = _random()
    for v in range(emb.num_embeddings):
        expected = sum(emb.coef[v, r] * torch.kron(emb.table_a[emb.index_a[v, r]],
                                                   emb.table_b[emb.index_b[v, r]])
                       for r in range(emb.coef.shape[1]))
        torch.testing.assert_close(emb(torch.tensor([v]))[0], expected)


def test_head_equals_dense_matmul_without_forming_it():
    emb = _random()
    h = torch.randn(2, 5, emb.embedding_dim)
    torch.testing.assert_close(EntangledHead(emb)(h), h @ emb.weight.T, rtol=1e-5, atol=1e-5)


def test_exact_reconstruction_of_a_rank_r_table():
    """A table that is exactly a sum of Kronecker products of its units is reproduced exactly."""
    emb = _random(V=7, R=2)
    dense = emb.weight.detach().clone()
    again = EntangledEmbedding(emb.table_a.detach(), emb.table_b.detach(), emb.index_a, emb.index_b,
                               emb.coef.detach())
    torch.testing.assert_close(again.weight, dense)
    # zero coefficients switch rank terms off: a token's rank can be smaller than R
    again.coef.data[0, 1] = 0.0
    torch.testing.assert_close(again.weight[0], emb.coef[0, 0] * torch.kron(
        emb.table_a[emb.index_a[0, 0]], emb.table_b[emb.index_b[0, 0]]))
    assert again.param_count() == 5 * 3 + 4 * 4 + 7 * 2


@pytest.mark.parametrize("units,strategy", [((3, 5), "pairs"), ((400, 300), "gather-b"),
                                            ((300, 400), "gather-a")])
def test_a_basis_maps_the_kronecker_sum_into_the_table_both_ways(units, strategy):
    """With a d' x d basis P the row is (sum_r c A[ia] (x) B[ib]) P, and every head strategy
    still equals h @ E^T (h is taken into the basis' coordinates first); the shapes survive
    describe/build and P counts as parameters."""
    from pocketformer.models.factored import build, describe

    g = torch.Generator().manual_seed(1)
    ua, ub = units
    V, R, d1, d2, d = 50, 3, 4, 6, 40
    core = EntangledEmbedding(torch.randn(ua, d1, generator=g), torch.randn(ub, d2, generator=g),
                              torch.randint(0, ua, (V, R), generator=g),
                              torch.randint(0, ub, (V, R), generator=g), torch.randn(V, R, generator=g))
    P = torch.randn(d1 * d2, d, generator=g)
    emb = EntangledEmbedding(core.table_a.detach(), core.table_b.detach(), core.index_a, core.index_b,
                             core.coef.detach(), basis=P)
    assert emb.embedding_dim == d and emb.core_dim == d1 * d2
    torch.testing.assert_close(emb(torch.arange(V)), core.weight @ P)
    assert emb.head_strategy() == strategy
    h = torch.randn(2, 7, d, generator=g)
    torch.testing.assert_close(emb.logits(h), h @ emb.weight.T, rtol=1e-4, atol=1e-4)
    assert emb.param_count() == core.param_count() + P.numel()
    entry = describe(emb)
    assert entry["d"] == d
    again = build(entry)
    again.load_state_dict(emb.state_dict(), strict=True)
    torch.testing.assert_close(again.weight, emb.weight)
    with pytest.raises(ValueError):
        EntangledEmbedding(core.table_a, core.table_b, core.index_a, core.index_b, core.coef,
                           basis=torch.randn(d1 * d2 + 1, d))


def test_factor_dim():
    assert factor_dim(384) == (16, 24)
    assert factor_dim(576) == (24, 24)
    assert factor_dim(576, 16) == (16, 36)
    with pytest.raises(ValueError):
        factor_dim(384, 7)


@pytest.mark.parametrize("units,strategy", [((3, 5), "pairs"), ((400, 300), "gather-b"),
                                            ((300, 400), "gather-a")])
def test_every_head_strategy_equals_the_dense_product(units, strategy):
    """Small inventories contract through M = A H B^T, large ones gather on the cheaper side;
    each equals h @ E^T."""
    torch.manual_seed(0)
    ua, ub = units
    V, R, d1, d2 = 50, 3, 4, 6
    emb = EntangledEmbedding(torch.randn(ua, d1), torch.randn(ub, d2), torch.randint(0, ua, (V, R)),
                             torch.randint(0, ub, (V, R)), torch.randn(V, R))
    h = torch.randn(2, 7, d1 * d2)
    assert emb.head_strategy() == strategy
    torch.testing.assert_close(emb.logits(h), h @ emb.weight.T, rtol=1e-4, atol=1e-4)


def test_strategy_choice_follows_cost():
    V, R = 50, 3
    small = EntangledEmbedding(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(V, R, dtype=torch.long),
                               torch.zeros(V, R, dtype=torch.long), torch.ones(V, R))
    assert small.head_strategy() == "pairs"
    big = EntangledEmbedding(torch.randn(400, 4), torch.randn(300, 6), torch.zeros(V, R, dtype=torch.long),
                             torch.zeros(V, R, dtype=torch.long), torch.ones(V, R))
    assert big.head_strategy() == "gather-b"   # U_b d1 d2 + V R d1 is the smallest


def test_weighted_als_favours_heavy_rows_and_never_rises():
    """Stage 1a with row weights (calibration counts): the weighted error never rises from sweep
    to sweep, and the heavily weighted rows end up fitted better than without weights."""
    from pocketformer.compress.see import als, row_weights

    g = torch.Generator().manual_seed(1)
    V, R, d1, d2 = 40, 2, 3, 4
    E = torch.randn(V, d1 * d2, generator=g)
    start = _random(V=V, R=R, Ua=6, Ub=5, d1=d1, d2=d2, seed=2)
    batches = [(torch.tensor([[0, 1, 2, 3, 0, 1]]), torch.tensor([[1, 1, 1, 1, 1, 0]]))]
    w = row_weights(batches, V, 50.0)
    # counts 2, 1, 1, 1 (the padded position is not counted), mean count 1.25
    assert w[0] == 1 + 50 * 2 / 1.25 and w[1] == w[2] == w[3] == 1 + 50 / 1.25 and w[4] == 1
    assert row_weights(batches, V, 0.0) is None
    plain, weighted = (EntangledEmbedding(start.table_a.detach().clone(), start.table_b.detach().clone(),
                                          start.index_a, start.index_b, start.coef.detach().clone())
                       for _ in range(2))
    active = torch.ones(V, R, dtype=torch.bool)
    als(plain, E, active, iters=15)
    errors = als(weighted, E, active, iters=15, weights=w)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    heavy = torch.arange(4)
    err = lambda emb: float(((emb.weight[heavy] - E[heavy]) ** 2).sum())
    assert err(weighted) < err(plain)


def _als_with_every_term(emb, E, active, iters, weights):
    """ALS as first written: each term's residual formed as a V x R x d tensor, and the
    coefficients solved against the explicit Kronecker products (the unit-row division itself,
    `solve_unit_rows`, is shared)."""
    from pocketformer.compress.see import solve_unit_rows
    from pocketformer.models.factored import kron_sum

    V, R = emb.index_a.shape
    dims, letters = emb.dims, "ijk"[:len(emb.dims)]
    M, mask, w = E.view(V, *dims), active.float(), weights
    for _ in range(iters):
        c = emb.coef * mask
        cw = c * w.unsqueeze(-1)
        for k, (table, index) in enumerate(zip(emb.tables, emb.indices)):
            f = [t[i] for t, i in zip(emb.tables, emb.indices)]
            terms = kron_sum(emb.coef, f, keep_rank=True)
            Rv = M.unsqueeze(1) - terms.sum(1, keepdim=True) + terms
            others = [x for j, x in enumerate(f) if j != k]
            spec = (f"vr,vr{letters}," + ",".join(f"vr{x}" for j, x in enumerate(letters) if j != k)
                    + f"->vr{letters[k]}")
            den = cw * c
            for x in others:
                den = den * (x ** 2).sum(-1)
            solve_unit_rows(table, index, torch.einsum(spec, cw, Rv, *others).reshape(-1, dims[k]), den)
        f = [t[i] for t, i in zip(emb.tables, emb.indices)]
        K = kron_sum(torch.ones_like(emb.coef), f, keep_rank=True).reshape(V, R, -1) * mask.unsqueeze(-1)
        gram = K @ K.transpose(1, 2) + 1e-6 * torch.eye(R)
        emb.coef.copy_(torch.linalg.solve(gram, (K @ M.reshape(V, -1, 1)).squeeze(-1)) * mask)


@pytest.mark.parametrize("order", [2, 3])
def test_als_without_the_term_tensor_is_the_same_sweeps(order):
    """`als` never forms the V x R x d terms (residual D_v plus the own term, contracted; the
    Gram matrix as products of the factors' inner products): its tables and coefficients
    equal the explicit formulation's after several weighted, masked sweeps (to float32
    rounding: the two sum in different orders). A token whose active terms repeat a unit pair
    has a singular Gram matrix (the 1e-6 ridge picks the split of the repeated term's
    coefficient, so float32 summation order can move it on another CPU): its row is compared,
    its coefficients are not."""
    from pocketformer.compress.see import als

    g = torch.Generator().manual_seed(4)
    emb = _random(V=23, R=3, Ua=5, Ub=4, d1=3, d2=4, seed=5) if order == 2 else \
        _random3(V=23, R=3, units=(5, 4, 6), dims=(2, 3, 2), seed=5)
    E = torch.randn(23, 12, generator=g)
    active = torch.rand(23, 3, generator=g) > 0.3
    active[:, 0] = True
    w = 1 + torch.rand(23, generator=g)
    ref = copy.deepcopy(emb)
    with torch.no_grad():
        _als_with_every_term(ref, E, active, 4, w)
        als(emb, E, active, iters=4, weights=w)
    for a, b in zip(emb.tables, ref.tables):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ids = torch.arange(len(E))
    torch.testing.assert_close(emb.rows(ids), ref.rows(ids), rtol=1e-4, atol=1e-4)
    terms = torch.stack(tuple(emb.indices), -1)                             # V R order
    repeats = torch.tensor([len({tuple(t) for t, a in zip(terms[v].tolist(), active[v]) if a})
                            < int(active[v].sum()) for v in ids.tolist()])
    assert 0 < int((~repeats).sum())
    torch.testing.assert_close(emb.coef[~repeats], ref.coef[~repeats], rtol=1e-4, atol=1e-4)
    assert float(emb.coef[~repeats].abs().max()) > 1e-4


def test_row_weighted_svd_is_the_weighted_optimum():
    """embed-svd's weighted initialisation (`weighted_svd`): the truncated SVD of diag(sqrt w) E,
    unscaled, beats the plain truncated SVD on the weighted error (it is the weighted rank-k
    optimum); without weights it is the plain truncated SVD."""
    from pocketformer.compress.see import weighted_svd

    g = torch.Generator().manual_seed(0)
    E = torch.randn(30, 8, generator=g)
    w = torch.ones(30)
    w[:5] = 100.0
    k = 3
    P, Q = weighted_svd(E, k, w)
    U0, S0, Vh0 = torch.linalg.svd(E.double(), full_matrices=False)
    plain = ((U0[:, :k] * S0[:k]) @ Vh0[:k]).float()
    P0, Q0 = weighted_svd(E, k)
    torch.testing.assert_close(P0 @ Q0, plain)
    werr = lambda X: float((w.unsqueeze(-1) * (X - E) ** 2).sum())
    assert werr(P @ Q) < werr(plain)


def _assert_table(emb, expected, tokens, h) -> dict:
    """`emb` (a slot wrapper) is the table `expected` in both directions, its rows, its lookups
    of `tokens` and its logits for `h`, and a loader rebuilds the same shapes from its config
    entry and loads its state strictly; returns that entry."""
    from pocketformer.models.factored import build, describe

    torch.testing.assert_close(emb.weight, expected)
    torch.testing.assert_close(emb(tokens), expected[tokens])
    torch.testing.assert_close(emb.logits(h), h @ expected.T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():           # outside training the head runs token-major (V x P)
        torch.testing.assert_close(emb.logits(h), h @ expected.T, rtol=1e-5, atol=1e-5)
        one = h.reshape(-1, h.shape[-1])[:1]
        torch.testing.assert_close(emb.logits(one), one @ expected.T, rtol=1e-5, atol=1e-5)
    entry = describe(emb)
    again = build(entry)
    again.load_state_dict(emb.state_dict(), strict=True)
    torch.testing.assert_close(again.weight, expected)
    return entry


@pytest.mark.parametrize("kind", ["entangled", "factored"])
def test_exact_rows_override_the_factored_rows_in_both_directions(kind):
    from pocketformer.models.factored import ExactRows, FactoredEmbedding

    V, d = 11, 12
    base = _random(V=V) if kind == "entangled" else FactoredEmbedding(torch.randn(V, 3), torch.randn(3, d))
    ids = torch.tensor([1, 4, 9])
    rows = torch.randn(3, d)
    emb = ExactRows(base, ids, rows)
    expected = base.weight.detach().clone()
    expected[ids] = rows
    _assert_table(emb, expected, torch.tensor([[0, 1, 4], [9, 10, 4]]), torch.randn(2, 5, d))
    assert emb.param_count() == base.param_count() + (3 + 1) * d



@pytest.mark.parametrize("kind", ["entangled", "factored"])
def test_low_rank_tier_under_exact_rows_in_both_directions(kind):
    """ExactRows(LowRankRows(base)): exact rows win, then the tier's coef @ basis rows, then the
    base's; the head's logits are those of that table, and a loader rebuilds it strictly."""
    from pocketformer.models.factored import ExactRows, FactoredEmbedding, LowRankRows, describe

    V, d, r = 13, 12, 4
    base = _random(V=V) if kind == "entangled" else FactoredEmbedding(torch.randn(V, 3), torch.randn(3, d))
    tier_ids, coef, basis = torch.tensor([0, 5, 6, 12]), torch.randn(4, r), torch.randn(r, d)
    exact_ids, rows = torch.tensor([2, 7]), torch.randn(2, d)
    emb = ExactRows(LowRankRows(base, tier_ids, coef, basis), exact_ids, rows)
    expected = base.weight.detach().clone()
    expected[tier_ids] = coef @ basis
    expected[exact_ids] = rows
    entry = _assert_table(emb, expected, torch.tensor([[0, 2, 3], [12, 7, 5]]), torch.randn(2, 5, d))
    assert emb.param_count() == base.param_count() + (4 + 1) * r + r * d + (2 + 1) * d
    assert entry["base"] == {"kind": "low-rank-rows", "rows": 4, "rank": r, "base": describe(base)}


def test_low_rank_rows_over_zero_rows_store_only_their_rows():
    """LowRankRows(ZeroRows): the SVD baseline's compact form, its tokens' rows coef @ basis and
    every other row (and logit) zero, with parameters for its own rows only; it reloads."""
    from pocketformer.models.factored import LowRankRows, ZeroRows

    V, d, r = 9, 6, 2
    ids, coef, basis = torch.tensor([1, 2, 8]), torch.randn(3, r), torch.randn(r, d)
    emb = LowRankRows(ZeroRows(V, d), ids, coef, basis)
    expected = torch.zeros(V, d)
    expected[ids] = coef @ basis
    _assert_table(emb, expected, torch.tensor([[0, 1, 8], [2, 3, 3]]), torch.randn(4, d))
    assert emb.param_count() == (3 + 1) * r + r * d == sum(p.numel() for p in emb.parameters())

def test_exported_slot_wrappers_combine_token_major_without_a_select():
    """A head of ExactRows(LowRankRows(entangled)) exported over a dynamic number of positions
    combines token-major: no select (aten.where) and no gather over the positions' axis, only
    row gathers of the V slots; it equals the table's product at any position count, and so
    does training's position-major select, even when the stored zero rows are not zero (both
    forms read them as zeros). At one fixed position (a decode step) the select stays."""
    from pocketformer.models.factored import ExactRows, LowRankRows, head_for

    V, d, r = 13, 12, 4
    base = _random(V=V)
    emb = ExactRows(LowRankRows(base, torch.tensor([0, 5, 6, 12]), torch.randn(4, r), torch.randn(r, d)),
                    torch.tensor([2, 7]), torch.randn(2, d))
    expected = emb.weight.detach().clone()
    with torch.no_grad():                      # values a zero row never has: neither form reads them
        emb.exact[-1].fill_(3.0)
        emb.base.coef[-1].fill_(-2.0)
    torch.testing.assert_close(emb.weight, expected)
    head = head_for(emb).eval()
    h = torch.randn(1, 6, d)
    seq = torch.export.Dim("seq", min=1, max=64)
    program = torch.export.export(head, (h,), dynamic_shapes=({1: seq},), strict=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.where.self not in targets, targets
    gathers = [n for n in program.graph.nodes if n.op == "call_function"
               and n.target == torch.ops.aten.index_select.default]
    assert gathers and all(n.args[1] == 0 for n in gathers), [n.args for n in gathers]
    for n in (1, 6, 40):
        x = torch.randn(1, n, d)
        torch.testing.assert_close(program.module()(x), x @ expected.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(x), x @ expected.T, rtol=1e-5, atol=1e-5)   # training's form
    one = torch.export.export(head, (h[:, -1:],), strict=False)
    assert torch.ops.aten.where.self in [n.target for n in one.graph.nodes if n.op == "call_function"]
    torch.testing.assert_close(one.module()(h[:, -1:]), h[:, -1:] @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_stored_term_weights_give_the_same_one_position_head_with_one_gather_less(order):
    """stored_term_weights: while open, a gathering head reads its term weights from a buffer
    (the exported one-position program stores them and gathers only the contracted rows); the
    logits are the same, and on exit the buffer is gone (nothing left for training or the
    state dict)."""
    from pocketformer.models.factored import stored_term_weights

    emb = _random(V=40, R=3, Ua=30, Ub=25) if order == 2 else _random3(V=40, units=(20, 15, 12))
    head = EntangledHead(emb).eval()
    assert emb.head_strategy() != "pairs", emb.head_costs()
    h = torch.randn(1, 1, emb.embedding_dim)
    want = h @ emb.weight.detach().T

    def gathers(program):
        return sum(n.op == "call_function" and n.target == torch.ops.aten.index_select.default
                   for n in program.graph.nodes)

    plain = torch.export.export(head, (h,), strict=False)
    with stored_term_weights(head) as held:
        assert held == [emb] and "term_weights" in dict(emb.named_buffers())
        torch.testing.assert_close(head(h), want, rtol=1e-5, atol=1e-5)
        stored = torch.export.export(head, (h,), strict=False)
    assert "term_weights" not in dict(emb.named_buffers()) and "term_weights" not in emb.state_dict()
    assert gathers(stored) == gathers(plain) - (order - 1), (gathers(stored), gathers(plain))
    assert any(tuple(t.shape) == (40, emb.coef.shape[1] * emb.core_dim // emb.dims[
        "abc".index(emb.head_strategy()[-1])]) for t in stored.constants.values())
    torch.testing.assert_close(stored.module()(h), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.module()(h), want, rtol=1e-5, atol=1e-5)


def test_low_rank_metric_is_exact_for_spike_plus_isotropic():
    """head_metric for SEE: M ~ c I + W W^T keeps the top-k eigen-directions exactly and the
    rest at their mean, which is M itself when M is k spikes on an isotropic floor."""
    from pocketformer.compress.see import metric_lowrank, metric_root

    g = torch.Generator().manual_seed(0)
    d, k = 12, 3
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.full((d,), 0.5, dtype=torch.float64)
    lam[:k] = torch.tensor([40.0, 9.0, 3.0], dtype=torch.float64)
    M = ((Q * lam) @ Q.T).float()
    c, W, share = metric_lowrank(M, k)
    assert c == pytest.approx(0.5, rel=1e-4) and W.shape == (d, k)
    torch.testing.assert_close(c * torch.eye(d) + W @ W.T, M, rtol=1e-4, atol=1e-4)
    assert share == pytest.approx(52 / (52 + 0.5 * (d - k)), rel=1e-4)
    L, L_inv = metric_root(M)
    torch.testing.assert_close(L @ L.T, M, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(L @ L_inv, torch.eye(d), rtol=1e-4, atol=1e-4)


def _kmeans_full_sweeps(x, k, sweeps, seed):
    """The loop as it was: every sweep compares every row with every centroid, no early return;
    returns (centroids, last assignment, first sweep whose assignment repeated the one before)."""
    from torch import nn

    from pocketformer.compress.see import _project

    g = torch.Generator().manual_seed(seed)
    y = _project(x, 64)
    ref = y[torch.randperm(len(y), generator=g)[:k]].clone()
    repeated, assign = None, None
    for i in range(sweeps):
        last, assign = assign, (y @ ref.T).argmax(-1)
        if repeated is None and last is not None and torch.equal(last, assign):
            repeated = i
        sums = torch.zeros_like(ref).index_add_(0, assign, y)
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1)
        ref = torch.where((counts == 0), ref, sums / counts.clamp(min=1))
        ref = nn.functional.normalize(ref, dim=-1)
    return ref, assign, repeated


def test_kmeans_stops_at_a_fixed_point_with_the_full_run_s_result():
    """kmeans returns once an assignment repeats; the centroids and assignment are exactly those
    of running every sweep, also when most rows are their own cluster (after the first sweep
    only moved centroids are compared with every row)."""
    from pocketformer.compress.see import kmeans

    x = torch.randn(3000, 24, generator=torch.Generator().manual_seed(0))
    for k in (40, 900, 2600):
        cent, assign = kmeans(x, k, iters=60, seed=3)
        ref, ref_assign, repeated = _kmeans_full_sweeps(x, k, 60, seed=3)
        assert repeated is not None and repeated < 59     # the early return was taken
        assert torch.equal(assign, ref_assign) and torch.equal(cent, ref)


def test_kmeans_breaks_ties_between_equal_centroids_as_a_full_sweep_does():
    """Duplicate rows make equal centroids, so rows tie between clusters (argmax takes the first;
    here two rows swap clusters every sweep, so no sweep repeats): the moved-centroid sweeps
    pick exactly the clusters full sweeps do."""
    from pocketformer.compress.see import kmeans

    x = torch.randn(3000, 24, generator=torch.Generator().manual_seed(0))
    x[2000:] = x[:1000]
    for k in (900, 2600):
        for sweeps in (7, 8):                 # both phases of the swap
            cent, assign = kmeans(x, k, iters=sweeps, seed=3)
            ref, ref_assign, _ = _kmeans_full_sweeps(x, k, sweeps, seed=3)
            assert torch.equal(assign, ref_assign) and torch.equal(cent, ref), (k, sweeps)


# ---- order 3: e_v = sum_r c A[ia] (x) B[ib] (x) C[ic] ------------------------------------------

def _random3(V=30, R=3, units=(5, 4, 6), dims=(2, 3, 4), seed=0, basis_width=None):
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(u, dk, generator=g) for u, dk in zip(units, dims)]
    index = [torch.randint(0, u, (V, R), generator=g) for u in units]
    coef = torch.randn(V, R, generator=g)
    basis = None if basis_width is None else torch.randn(dims[0] * dims[1] * dims[2], basis_width,
                                                         generator=g)
    return EntangledEmbedding(tables[0], tables[1], index[0], index[1], coef, basis=basis,
                              table_c=tables[2], index_c=index[2])


def test_order_3_rows_are_sums_of_triple_kronecker_products():
    emb = _random3()
    assert emb.order == 3 and emb.dims == (2, 3, 4) and emb.embedding_dim == 24
    for v in range(emb.num_embeddings):
        expected = sum(emb.coef[v, r] * torch.kron(torch.kron(emb.table_a[emb.index_a[v, r]],
                                                              emb.table_b[emb.index_b[v, r]]),
                                                   emb.table_c[emb.index_c[v, r]])
                       for r in range(emb.coef.shape[1]))
        torch.testing.assert_close(emb(torch.tensor([v]))[0], expected)
    assert emb.param_count() == 5 * 2 + 4 * 3 + 6 * 4 + 30 * 3
    with pytest.raises(ValueError):
        EntangledEmbedding(emb.table_a, emb.table_b, emb.index_a, emb.index_b, emb.coef,
                           table_c=emb.table_c)                      # a table without its index


@pytest.mark.parametrize("units,strategy", [((300, 4, 6), "gather-c"), ((5, 300, 6), "gather-c"),
                                            ((5, 4, 300), "gather-b"), ((3, 400, 400), "gather-a")])
@pytest.mark.parametrize("basis_width", [None, 30])
def test_order_3_head_gathers_on_the_cheapest_mode_and_equals_the_dense_product(units, strategy,
                                                                                basis_width):
    """The order-3 head contracts H (d1 x d2 x d3) along one mode, gathers V R rows and dots them
    with c * (the other two factors' Kronecker product); every mode equals h @ E^T, with or
    without a basis, and the shapes survive describe/build."""
    from pocketformer.models.factored import build, describe

    emb = _random3(V=50, units=units, basis_width=basis_width)
    costs = emb.head_costs()
    assert "pairs" not in costs and emb.head_strategy() == strategy == min(costs, key=costs.get)
    k = "abc".index(strategy[-1])
    assert emb.intermediate_per_position() == 50 * 3 * (24 // emb.dims[k])
    h = torch.randn(2, 5, emb.embedding_dim)
    torch.testing.assert_close(emb._logits(h), h @ emb.weight.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(EntangledHead(emb)(h), h @ emb.weight.T, rtol=1e-4, atol=1e-4)
    again = build(describe(emb))
    again.load_state_dict(emb.state_dict(), strict=True)
    torch.testing.assert_close(again.weight, emb.weight)


def test_order_3_als_never_rises_and_fits_an_exact_product_table_closely():
    """Stage 1a's least squares at order 3: each sweep's error is no higher than the last, and a
    table that is itself a sum of triple products of shared units (same indices) is fitted far
    below a random table's error."""
    from pocketformer.compress.see import als

    truth = _random3(V=60, R=2, seed=3)
    E = truth.weight.detach()
    start = _random3(V=60, R=2, seed=4)
    fit = EntangledEmbedding(start.table_a.detach(), start.table_b.detach(), truth.index_a,
                             truth.index_b, start.coef.detach(), table_c=start.table_c.detach(),
                             index_c=truth.index_c)
    errors = als(fit, E, torch.ones(60, 2, dtype=torch.bool), iters=40)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0] and errors[-1] < 1e-2, errors


def test_factor_dims():
    from pocketformer.models.factored import factor_dims

    assert factor_dims(384, 2) == (16, 24)
    assert factor_dims(384, 3) == (6, 8, 8)
    assert factor_dims(576, 3) == (8, 8, 9)
    assert factor_dims(90, 3) == (3, 5, 6)
    assert factor_dims(384, 3, d1=4) == (4, 8, 12)
    for bad in [(14, 3, None), (91, 3, None), (384, 3, 5), (384, 4, None)]:
        with pytest.raises(ValueError):
            factor_dims(*bad)


@pytest.mark.parametrize("order", [2, 3])
def test_balance_units_fixes_the_gauge_and_keeps_every_row(order):
    """balance_units: units drifted to wildly different norms (one 1e4 times its partners) come
    back to their table's median norm, the coefficients take the scale, unused units and
    inactive (zero) coefficients are left alone, and every row is the same as before."""
    from pocketformer.compress.see import balance_units

    emb = _random(V=30, Ua=6, Ub=5) if order == 2 else _random3(V=30)
    with torch.no_grad():
        emb.table_a[0] *= 1e4
        emb.table_b[1] *= 1e-3
        emb.coef[0, 0] = 0.0
        emb.table_a[5 if order == 2 else 4] = 0.0        # an unused (all-zero) unit
    before = emb.weight.detach().clone()
    rec = balance_units(emb)
    assert rec["unit_max_before"] > 1e3 and rec["unit_max_after"] < 10
    torch.testing.assert_close(emb.weight.detach(), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    for table in emb.tables:
        norms = table.detach().norm(dim=1)
        used = norms > 0
        torch.testing.assert_close(norms[used], torch.full_like(norms[used], float(norms[used].median())))
    assert float(emb.coef[0, 0]) == 0.0
    assert int((emb.table_a.detach().norm(dim=1) == 0).sum()) == 1


@pytest.mark.parametrize("order", [2, 3])
def test_reassign_units_finds_the_true_units_and_never_raises_the_error(order):
    """reassign_units: with the true unit tables, one wrong unit per token (a form unit B of a
    token whose A unit is a WordNet one, or a data-driven A unit) and wrong coefficients, one
    round puts every term back on its true unit with its true coefficient (the error falls to
    ~0). On a table no Kronecker sum holds, the error never rises over rounds, the A units of
    the terms marked as WordNet ones (`fixed_a`) never move, moved A units stay among the
    data-driven ones (index >= data_from) and inactive terms keep their indices."""
    from pocketformer.compress.see import als, reassign_units

    truth = _random(V=80, R=1, Ua=12, Ub=9) if order == 2 else _random3(V=80, R=1, units=(12, 6, 7), seed=5)
    with torch.no_grad():
        truth.index_a[40:] = 4 + truth.index_a[40:] % 8      # the second half's A units: data units
        truth.coef.abs_().add_(0.5)
    E = truth.weight.detach().clone()
    V = E.shape[0]
    active = torch.ones(V, 1, dtype=torch.bool)
    fixed = torch.zeros(V, 1, dtype=torch.bool)
    fixed[:40] = True                                # the first half's A units are "knowledge"
    g = torch.Generator().manual_seed(1)
    fit = copy.deepcopy(truth)
    with torch.no_grad():                            # one wrong unit per token, the rest true
        Ub = fit.table_b.shape[0]
        fit.index_b[:40] = (fit.index_b[:40] + torch.randint(1, Ub, (40, 1), generator=g)) % Ub
        fit.index_a[40:] = 4 + (fit.index_a[40:] - 4 + torch.randint(1, 8, (40, 1), generator=g)) % 8
        fit.coef.mul_(torch.rand(V, 1, generator=g) + 0.5)

    def err(m):
        return float(((m.weight.detach() - E) ** 2).sum() / (E ** 2).sum())

    start = err(fit)
    moved = reassign_units(fit, E, active, fixed, data_from=4)
    assert start > 0.3 and err(fit) < 1e-8, (start, err(fit))
    assert moved == 80
    for index, true in zip(fit.indices, truth.indices):
        assert torch.equal(index, true)
    torch.testing.assert_close(fit.coef.detach(), truth.coef.detach())

    # a table no sum of shared Kronecker terms holds: every round (and sweep) only lowers the error
    truth = _random(V=80, R=2, Ua=12, Ub=9) if order == 2 else _random3(V=80, R=2, units=(12, 6, 7), seed=5)
    E = torch.randn(V, truth.embedding_dim, generator=g)
    active = torch.ones(V, 2, dtype=torch.bool)
    active[::3, 1] = False
    fixed = torch.zeros(V, 2, dtype=torch.bool)
    fixed[:, 0] = True
    fit = copy.deepcopy(truth)
    with torch.no_grad():
        fit.coef[~active] = 0.0
    als(fit, E, active, iters=3)
    before_a, before_idx = fit.index_a.clone(), [i.clone() for i in fit.indices]
    errors = [err(fit)]
    for _ in range(3):
        assert reassign_units(fit, E, active, fixed, data_from=4) > 0
        errors.append(err(fit))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0], errors
    assert torch.equal(fit.index_a[:, 0], before_a[:, 0])
    moved = fit.index_a != before_a
    assert bool(moved.any()) and bool((fit.index_a[moved] >= 4).all())
    for index, before in zip(fit.indices, before_idx):
        assert torch.equal(index[~active], before[~active])


def test_reassign_units_with_no_data_driven_a_units_moves_only_the_form_units():
    """Every A unit a WordNet one (data_from = the table's size, as when WordNet covers every
    token): the A side has no candidates and is skipped, the form units still move."""
    from pocketformer.compress.see import reassign_units

    fit = _random(V=40, R=2, Ua=6, Ub=5)
    E = torch.randn(40, fit.embedding_dim, generator=torch.Generator().manual_seed(2))
    before_a, before_b = fit.index_a.clone(), fit.index_b.clone()
    moved = reassign_units(fit, E, torch.ones(40, 2, dtype=torch.bool), None, data_from=6)
    assert torch.equal(fit.index_a, before_a)
    assert moved > 0 and moved == int((fit.index_b != before_b).sum())
