"""Exact algebra of the entangled (Kronecker) embedding on small shapes."""
from __future__ import annotations

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


@pytest.mark.parametrize("kind", ["entangled", "factored"])
def test_exact_rows_override_the_factored_rows_in_both_directions(kind):
    from pocketformer.models.factored import ExactRows, FactoredEmbedding, build, describe

    V, d = 11, 12
    base = _random(V=V) if kind == "entangled" else FactoredEmbedding(torch.randn(V, 3), torch.randn(3, d))
    ids = torch.tensor([1, 4, 9])
    rows = torch.randn(3, d)
    emb = ExactRows(base, ids, rows)
    expected = base.weight.detach().clone()
    expected[ids] = rows
    torch.testing.assert_close(emb.weight, expected)
    tokens = torch.tensor([[0, 1, 4], [9, 10, 4]])
    torch.testing.assert_close(emb(tokens), expected[tokens])
    h = torch.randn(2, 5, d)
    torch.testing.assert_close(emb.logits(h), h @ expected.T, rtol=1e-5, atol=1e-5)
    assert emb.param_count() == base.param_count() + (3 + 1) * d
    # a loader rebuilds the same shapes from the config entry, and the state loads strictly
    again = build(describe(emb))
    again.load_state_dict(emb.state_dict(), strict=True)
    torch.testing.assert_close(again.weight, expected)



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


def test_kmeans_stops_at_a_fixed_point_with_the_full_run_s_result():
    """kmeans returns once an assignment repeats; the centroids and assignment are exactly those
    of running every sweep (the loop as it was, without the early return)."""
    from torch import nn

    from pocketformer.compress.see import _project, kmeans

    x = torch.randn(3000, 24, generator=torch.Generator().manual_seed(0))
    for k in (40, 900):
        cent, assign = kmeans(x, k, iters=60, seed=3)
        g = torch.Generator().manual_seed(3)
        y = _project(x, 64)
        ref = y[torch.randperm(len(y), generator=g)[:k]].clone()
        repeated = None                 # the sweep whose assignment equals the one before
        for i in range(60):
            last, ref_assign = (ref_assign if i else None), (y @ ref.T).argmax(-1)
            if repeated is None and last is not None and torch.equal(last, ref_assign):
                repeated = i
            sums = torch.zeros_like(ref).index_add_(0, ref_assign, y)
            counts = torch.bincount(ref_assign, minlength=k).unsqueeze(-1)
            ref = torch.where((counts == 0), ref, sums / counts.clamp(min=1))
            ref = nn.functional.normalize(ref, dim=-1)
        assert repeated is not None and repeated < 59     # the early return was taken
        assert torch.equal(assign, ref_assign) and torch.equal(cent, ref)
