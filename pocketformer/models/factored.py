"""Factored token embeddings that replace nn.Embedding (and a tied LM head) in a model: the
entangled (Kronecker) embedding SEE builds word vectors with, and the ALBERT-style low-rank table.
They live with the adapters because saved models, exporters and runtimes all need them.

Each token v has R rank terms; term r picks one row of each shared unit table and weights their
Kronecker product:

    e_v = sum_r c[v, r] * A[ia[v, r]] (x) B[ib[v, r]]        A: U_a x d1, B: U_b x d2, d = d1 d2

(order 2; a term with c = 0 is unused, so tokens may have different ranks). Read as a d1 x d2
matrix, e_v = sum_r c A[ia]^T B[ib] is a rank <= R matrix assembled from shared pieces. Order 3
adds a third table, C: U_c x d3, and index ic: e_v = sum_r c A[ia] (x) B[ib] (x) C[ic], d = d1 d2 d3
(a CP decomposition of the d1 x d2 x d3 tensor of each token with factors from shared tables).

The tensor-product split of the embedding space needs a basis. With `basis` (a d' x d matrix,
d' = d1 d2 <= d) the Kronecker sum gives a token's coordinates in that basis and the row is
e_v = (sum_r c A[ia] (x) B[ib]) basis; pocketformer starts it at the table's principal directions
(docs/see.md). Without it the split is taken in the table's own coordinates (d' = d).

The tied output head never forms the V x d matrix. For a hidden state h (a d1 x d2 matrix H),

    <h, e_v> = sum_r c[v, r] * A[ia[v, r]] H B[ib[v, r]]^T

and the head picks, once per module, the cheapest of three contractions (multiply-adds per
position; the dense head costs V d):

    pairs:     M = A H B^T (U_a x U_b), gather V R entries      U_a d1 d2 + U_a U_b d2 + V R
    gather-a:  A H (U_a x d2), gather its rows, dot with B[ib]  U_a d1 d2 + V R d2
    gather-b:  H B^T (d1 x U_b), gather its columns, dot A[ia] U_b d1 d2 + V R d1

"pairs" wins for small inventories; at high parameter budgets (large unit tables) one of the
gathers does, and its run-time intermediate is V R d_small per position instead of V d. Over
many positions that intermediate outgrows the V x d' table of coordinates (the Kronecker sums,
V R d' multiply-adds to assemble), and the head assembles it and multiplies by it instead
(`logits`): at 128 positions of SmolLM2 at 10x, 63 MB against 0.8 GB.

At order 3 the head contracts H (d1 x d2 x d3) along one mode k with that mode's table, gathers
the V R rows of the result and dots each with c * (the Kronecker product of the term's other two
factors): U_k d1 d2 d3 + V R d / d_k multiply-adds, the cheapest k chosen ("gather-a", "gather-b",
"gather-c"; "pairs" would need the U_a x U_b x U_c tensor and is not offered).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def factor_dims(d: int, order: int, d1: int | None = None) -> tuple[int, ...]:
    """Split d into `order` factors: order 2 is factor_dim; order 3 the most cube-like d1 <= d2
    <= d3 with every factor at least 2 (smallest d3 / d1; 384 = 6 x 8 x 8, 576 = 8 x 8 x 9), or,
    with d1 given, d1 x (the most square split of d / d1)."""
    if order == 2:
        return factor_dim(d, d1)
    if order != 3:
        raise ValueError(f"order {order} is not implemented (2 or 3)")
    if d1 is not None:
        if d % d1 or d1 < 2:
            raise ValueError(f"{d1} does not divide {d}")
        a, b = factor_dim(d // d1)
        if a < 2:
            raise ValueError(f"{d // d1} (= {d} / {d1}) has no split into two factors of at least 2")
        return d1, a, b
    best = None
    for a in range(2, int(round(d ** (1 / 3))) + 2):
        if d % a:
            continue
        for b in range(a, int((d // a) ** 0.5) + 1):
            if (d // a) % b == 0:
                c = d // a // b
                if best is None or c / a < best[2] / best[0]:
                    best = (a, b, c)
    if best is None:
        raise ValueError(f"{d} has no split into three factors of at least 2")
    return best


def factor_dim(d: int, d1: int | None = None) -> tuple[int, int]:
    """Split d = d1 * d2 with d1 <= d2 as close as possible (or d1 as given)."""
    if d1 is not None:
        if d % d1:
            raise ValueError(f"{d1} does not divide {d}")
        return d1, d // d1
    best = 1
    for a in range(1, int(d ** 0.5) + 1):
        if d % a == 0:
            best = a
    return best, d // best


class EntangledEmbedding(nn.Module):
    def __init__(self, table_a: torch.Tensor, table_b: torch.Tensor, index_a: torch.Tensor,
                 index_b: torch.Tensor, coef: torch.Tensor, padding_idx: int | None = None,
                 basis: torch.Tensor | None = None, table_c: torch.Tensor | None = None,
                 index_c: torch.Tensor | None = None):
        super().__init__()
        if (table_c is None) != (index_c is None):
            raise ValueError("order 3 needs both table_c and index_c")
        if index_a.shape != index_b.shape or index_a.shape != coef.shape or (
                index_c is not None and index_c.shape != coef.shape):
            raise ValueError("the indices and coef must all be V x R")
        self.table_a = nn.Parameter(table_a.float())
        self.table_b = nn.Parameter(table_b.float())
        self.table_c = None if table_c is None else nn.Parameter(table_c.float())
        self.coef = nn.Parameter(coef.float())
        if basis is not None and basis.shape[0] != self.core_dim:
            raise ValueError("basis must have d1 x d2 (x d3) rows")
        self.basis = None if basis is None else nn.Parameter(basis.float())
        self.register_buffer("index_a", index_a.to(torch.int64))
        self.register_buffer("index_b", index_b.to(torch.int64))
        if index_c is not None:
            self.register_buffer("index_c", index_c.to(torch.int64))
        else:
            self.index_c = None
        self.padding_idx = padding_idx
        # The head sums its row-wise products with a ones vector (`_rowwise_dot`). A buffer, not a
        # tensor made in forward: export then sees a constant weight, which XNNPACK delegates.
        self.register_buffer("dot_ones", torch.ones(1, coef.shape[1] * self._term_width()),
                             persistent=False)

    @property
    def order(self) -> int:
        return 2 if self.table_c is None else 3

    @property
    def tables(self) -> list[torch.Tensor]:
        """The unit tables, one per Kronecker factor (A, B[, C])."""
        return [self.table_a, self.table_b] + ([] if self.table_c is None else [self.table_c])

    @property
    def indices(self) -> list[torch.Tensor]:
        return [self.index_a, self.index_b] + ([] if self.index_c is None else [self.index_c])

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(t.shape[1] for t in self.tables)

    @property
    def num_embeddings(self) -> int:
        return self.index_a.shape[0]

    @property
    def core_dim(self) -> int:
        """d1 d2 (d3): the width of the Kronecker sum (the coordinates in `basis`, when there is one)."""
        return math.prod(self.dims)

    @property
    def embedding_dim(self) -> int:
        return self.core_dim if self.basis is None else self.basis.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dense V x d table (for inspection and tests; forward never builds it)."""
        coords = self.coordinates()
        return coords if self.basis is None else coords @ self.basis

    def coordinates(self) -> torch.Tensor:
        """Every token's Kronecker sum, V x d': its row in the basis's coordinates (the row
        itself without a basis). V R d' multiply-adds."""
        factors = [_take_rows(t, i) for t, i in zip(self.tables, self.indices)]  # V x R x d_k
        return kron_sum(self.coef, factors).reshape(self.num_embeddings, self.core_dim)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        factors = [_take_rows(t, _take_rows(i, ids)) for t, i in zip(self.tables, self.indices)]  # ... x R x d_k
        out = kron_sum(_take_rows(self.coef, ids), factors).reshape(*ids.shape, self.core_dim)
        return out if self.basis is None else out @ self.basis

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids)

    def head_costs(self) -> dict[str, int]:
        """Multiply-adds per position of each way to compute the tied head (see the module doc)."""
        vr = self.index_a.numel()
        into = 0 if self.basis is None else self.basis.numel()    # h basis^T, once per position
        d = self.core_dim
        costs = {f"gather-{'abc'[k]}": into + t.shape[0] * d + vr * (d // t.shape[1])
                 for k, t in enumerate(self.tables)}
        if self.order == 2:
            (ua, d1), (ub, d2) = self.table_a.shape, self.table_b.shape
            costs = {"pairs": into + ua * d1 * d2 + ua * ub * d2 + vr, **costs}
        return costs

    def head_strategy(self) -> str:
        costs = self.head_costs()
        return min(costs, key=costs.get)

    def _term_width(self) -> int:
        """Floats the head gathers per rank term: one entry of M for "pairs", else a row of the
        contracted table, as wide as the product of the other modes' sizes."""
        strategy = self.head_strategy()
        if strategy == "pairs":
            return 1
        return self.core_dim // self.dims[_gather_mode(strategy)]

    def intermediate_per_position(self) -> int:
        """Floats of the head's largest run-time intermediate for one position."""
        if self.head_strategy() == "pairs":
            return self.table_a.shape[0] * self.table_b.shape[0]
        return self.index_a.numel() * self._term_width()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> [..., V], equal to hidden @ weight.T without forming weight.

        Few positions (a decode step, a generation program's last prompt position) run the
        factored contraction. When the positions at hand would make its intermediate (V R
        d_small floats per position for a gather, 19 MB for SmolLM2 at 10x) larger than the
        V x d' table of coordinates, that table is assembled for the call instead (V R d'
        multiply-adds, gradients flowing to the units) and the head is (h basis^T) coords^T:
        training and scoring windows, in eager mode and in exported programs alike. With a
        basis of d' < d rows the V x d table itself is still never formed. An
        exported program whose position count is a dynamic dimension (a scoring program over
        windows of any length) takes the table: the rule cannot be decided on a symbolic size,
        and such a program is for many positions."""
        if self._table_pays(hidden.shape[:-1]):
            coords = self.coordinates()
            if self.basis is not None:
                hidden = F.linear(hidden, self.basis)
            # a batched matmul: XNNPACK delegates it with a computed right-hand side, where a
            # linear (or mm) by a tensor that is not a stored weight stays in the portable mm
            flat = hidden.reshape(1, -1, hidden.shape[-1])
            out = torch.bmm(flat, coords.transpose(0, 1).unsqueeze(0))
            return out.reshape(*hidden.shape[:-1], coords.shape[0])
        return self._logits(hidden)

    def _table_pays(self, lead: torch.Size) -> bool:
        """Whether `lead` positions make the factored head's intermediate larger than V x d'."""
        count = _fixed_count(lead)
        if count is None:
            return True
        return count * self.intermediate_per_position() > self.num_embeddings * self.core_dim

    def logits_t(self, flat: torch.Tensor) -> torch.Tensor:
        """The logits of P positions (`flat`, P x d) token-major, V x P (what `_SlotRows` combines
        in): over many positions the table of coordinates times the positions, coords (h
        basis^T)^T, a batched matmul XNNPACK delegates; over few the factored contraction,
        transposed."""
        if self._table_pays(flat.shape[:-1]):
            coords = self.coordinates()
            if self.basis is not None:
                flat = F.linear(flat, self.basis)
            return torch.bmm(coords.unsqueeze(0), flat.transpose(0, 1).unsqueeze(0)).squeeze(0)
        return self._logits(flat).transpose(0, 1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        dims, n = self.dims, self.order
        if self.basis is not None:
            hidden = F.linear(hidden, self.basis)                              # ... x d'
        H = hidden.reshape(*hidden.shape[:-1], *dims)
        strategy = self.head_strategy()
        # Products with a table are written as F.linear (x @ table.T) and the final weighted
        # sums as batched matmuls, the two forms XNNPACK takes into its delegate.
        if strategy == "pairs":
            left = F.linear(H.transpose(-1, -2), self.table_a)                # ... x d2 x U_a
            M = F.linear(left.transpose(-1, -2), self.table_b)                # ... x U_a x U_b
            flat = M.reshape(*M.shape[:-2], -1)
            idx = self.index_a * self.table_b.shape[0] + self.index_b         # V x R
            picked = flat.index_select(-1, idx.reshape(-1)).reshape(*flat.shape[:-1], *idx.shape)
            return _rowwise_dot(picked, self.coef, self.dot_ones)
        # gather on mode k: contract H's k-th axis with table k (... x others x U_k), gather
        # its V R rows, dot each with c * (the Kronecker product of the term's other factors)
        k = _gather_mode(strategy)
        table, index = self.tables[k], self.indices[k]
        lead = H.shape[:-n]
        Hk = H.movedim(len(lead) + k, -1)                                     # ... x others x d_k
        side = F.linear(Hk, table)                                            # ... x others x U_k
        side = side.reshape(*lead, -1, table.shape[0]).transpose(-1, -2).contiguous()  # ... x U_k x others
        V, R = index.shape
        kk = side.shape[-1]
        picked = side.index_select(-2, index.reshape(-1)).reshape(*lead, V, R * kk)
        weights = getattr(self, "term_weights", None)
        if weights is None:
            weights = self.gather_weights(k)
        return _rowwise_dot(picked, weights, self.dot_ones)

    def gather_weights(self, k: int) -> torch.Tensor:
        """V x R * (d / d_k): what a gather on mode k dots its gathered rows with, each term's
        coefficient times the Kronecker product of its other factors. It depends on the stored
        values only (stored_term_weights)."""
        others = [_take_rows(t, i) for j, (t, i) in enumerate(zip(self.tables, self.indices)) if j != k]
        return kron_sum(self.coef, others, keep_rank=True).reshape(self.num_embeddings, -1)

    def param_count(self) -> int:
        return (sum(t.numel() for t in self.tables) + self.coef.numel()
                + (0 if self.basis is None else self.basis.numel()))


@contextlib.contextmanager
def stored_term_weights(model: nn.Module):
    """While open, every EntangledEmbedding in `model` whose head gathers on a mode keeps that
    gather's weights (`gather_weights`) as a buffer, `term_weights`, which `_logits` reads
    instead of rebuilding them: for exporting a program whose head runs at one position (a
    generation program's decode step and last prompt position). The program then stores
    V R d / d_k floats (6.3 MB for SmolLM2 at 10x with a 16 x 20 basis) and skips, on each
    call, a gather of V R unit rows and their products, which ExecuTorch runs in its portable
    kernels (that head: 4.5 -> 2.1 ms, docs/see.md). The buffers are values of the stored tables
    at the time, not parameters: they are removed on exit, so training and other exports never
    see them."""
    held = [m for m in model.modules()
            if isinstance(m, EntangledEmbedding) and m.head_strategy() != "pairs"]
    try:
        for m in held:
            with torch.no_grad():
                weights = m.gather_weights(_gather_mode(m.head_strategy()))
                m.register_buffer("term_weights", weights.detach().clone(), persistent=False)
        yield held
    finally:
        for m in held:
            m._buffers.pop("term_weights", None)


def _gather_mode(strategy: str) -> int:
    """The mode (0, 1, 2 for A, B, C) a "gather-a|b|c" head strategy contracts and gathers on."""
    return "abc".index(strategy[-1])


def _fixed_count(lead: torch.Size) -> int | None:
    """The number of positions in `lead`, or None when an exported program leaves one of its
    sizes dynamic (a symbolic size has no value to decide on)."""
    if any(isinstance(n, torch.SymInt) for n in lead):
        return None
    return math.prod(lead)


def kron_sum(coef: torch.Tensor, factors: list[torch.Tensor], keep_rank: bool = False) -> torch.Tensor:
    """sum_r coef[..., r] * f1[..., r, :] (x) f2[..., r, :] (x) ..., as a [..., d1, d2, ...]
    tensor (its row-major flattening is the Kronecker product); with keep_rank the terms are
    returned unsummed, [..., R, d1, d2, ...]. One factor gives coef * f1."""
    letters = "ijkl"[:len(factors)]
    out = f"...r{letters}" if keep_rank else f"...{letters}"
    spec = ",".join(["...r"] + [f"...r{x}" for x in letters]) + "->" + out
    return torch.einsum(spec, coef, *factors)


def _take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an index of any shape, as one index_select: ExecuTorch runs
    index_select as a row copy, where advanced indexing (index.Tensor) runs a generic
    per-element kernel (a SmolLM2 10x head's gathers took 18.5 ms that way, 2 ms this way)."""
    return table.index_select(0, index.reshape(-1)).reshape(*index.shape, *table.shape[1:])


def _rowwise_dot(picked: torch.Tensor, weights: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """out[..., v] = sum_x picked[..., v, x] * weights[v, x]: one broadcast multiply, then the
    sum over x as a product with `ones` (1 x X). XNNPACK takes a multiply and a linear into its
    delegate, not a sum. The batched matmul of V 1 x X products this replaces took 3.9-5.8 ms
    of a SmolLM2 10x head at one position; the multiply and the product take under 1 ms."""
    return F.linear(picked * weights, ones).squeeze(-1)


class _TiedHead(nn.Module):
    """A tied LM head (replaces nn.Linear(d, V, bias=False)) that computes logits from a factored
    embedding's `logits` without forming its dense table."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden)


class EntangledHead(_TiedHead):
    """The tied head of an EntangledEmbedding."""


class FactoredEmbedding(nn.Module):
    """ALBERT-style E = P Q: a V x k table and a k x d projection."""

    def __init__(self, P: torch.Tensor, Q: torch.Tensor):
        super().__init__()
        self.P = nn.Parameter(P.float())
        self.Q = nn.Parameter(Q.float())

    @property
    def weight(self) -> torch.Tensor:
        return self.P @ self.Q

    @property
    def num_embeddings(self) -> int:
        return self.P.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.Q.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.P) @ self.Q

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # linears of the parameters as stored: XNNPACK delegates these; (h Q^T) P^T as two
        # matmuls of transposes stayed in the portable kernels (mm)
        return F.linear(F.linear(hidden, self.Q), self.P)

    def logits_t(self, flat: torch.Tensor) -> torch.Tensor:
        """The logits of P positions token-major, V x P (`_SlotRows`)."""
        return self.logits(flat).transpose(0, 1)

    def param_count(self) -> int:
        return self.P.numel() + self.Q.numel()


class FactoredHead(_TiedHead):
    """The tied head of a FactoredEmbedding."""


class _SlotRows(nn.Module):
    """Rows of its own for some tokens over a `base` table for the rest. `slot[v]` is token v's
    row in the wrapper's table (K + 1 rows, the last all zeros: the slot of every token the
    wrapper does not hold), so both directions are gathers and a select, no scatter:

        rows(ids)  = where(slot[ids] < K, own_rows(slot[ids]), base(ids))
        logits(h)  = where(slot < K, own_scores(h)[..., slot], base.logits(h))

    A subclass gives `_own_rows` (its rows for given slots) and `_own_scores` (h against each of
    its K + 1 rows).

    Outside training (inference, exported programs) the head runs token-major, one row per
    token, V x P:

        logits(h)^T = base.logits_t(h) * [slot >= K] + [own_scores(h)^T[:K]; 0][slot]

    The gather then copies whole rows of P floats, and the select becomes a multiply and an
    add, which XNNPACK delegates; the portable kernels ran the select and a per-element gather
    over P x V (a SmolLM2 10x head with exact rows and a tier at 128 positions: 156 -> 68 ms in
    the `.pte`, docs/see.md). The transposed own scores are small (K + 1 x P). Slot K's scores are a
    constant zero row, not the stored last row's, so the two forms agree exactly for any stored
    values; they are cut from the scores, not from the stored table, which an exporter would
    fold into a second copy in the file. Training keeps the position-major select: its backward
    over many positions is faster that way. So does a single position (a decode step), where
    one per-element gather of V floats beats V row copies of one float (5.5 against 6.7 ms in
    that `.pte`; docs/see.md)."""

    def _slots(self, base: nn.Module, ids: torch.Tensor) -> int:
        V, K = base.num_embeddings, int(ids.numel())
        slot = torch.full((V,), K, dtype=torch.int64)
        slot[ids.to(torch.int64)] = torch.arange(K)
        self.base = base
        self.register_buffer("slot", slot)
        return K

    @property
    def rows_kept(self) -> int:
        raise NotImplementedError

    def _own_rows(self, slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _own_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        keep = (self.slot < self.rows_kept).unsqueeze(-1)
        return torch.where(keep, self._own_rows(self.slot), self.base.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = _take_rows(self.slot, input_ids)
        return torch.where((s < self.rows_kept).unsqueeze(-1), self._own_rows(s), self.base(input_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        one = _fixed_count(hidden.shape[:-1]) == 1
        if one or (torch.is_grad_enabled() and not torch.compiler.is_exporting()):
            own = self._own_scores(hidden).index_select(-1, self.slot)
            return torch.where(self.slot < self.rows_kept, own, self.base.logits(hidden))
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.logits_t(flat).transpose(0, 1).reshape(*hidden.shape[:-1], self.num_embeddings)

    def logits_t(self, flat: torch.Tensor) -> torch.Tensor:
        """The logits of P positions (`flat`, P x d) token-major, V x P (the class doc)."""
        own = self._own_scores(flat).transpose(0, 1)[:-1]    # K x P: the linears XNNPACK delegates
        own = torch.cat([own, own.new_zeros(1, own.shape[1])])  # a constant zero row for slot K
        rest = (self.slot >= self.rows_kept).unsqueeze(-1).to(own.dtype)
        return self.base.logits_t(flat) * rest + own.index_select(0, self.slot)


class ExactRows(_SlotRows):
    """A factored embedding (entangled or low-rank) in which K chosen tokens, the ones the user's
    calibration text uses most, keep their exact rows (`exact`, K + 1 x d); every other token
    reads the factored form (_SlotRows):

        rows(ids)  = where(slot[ids] < K, exact[slot[ids]], base(ids))
        logits(h)  = where(slot < K, (h exact^T)[..., slot], base.logits(h))

    The exact head costs (K + 1) d multiply-adds per position on top of the factored one."""

    def __init__(self, base: nn.Module, ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        K = self._slots(base, ids)
        self.exact = nn.Parameter(torch.cat([rows.float().reshape(K, -1),
                                             torch.zeros(1, base.embedding_dim)]))

    @property
    def rows_kept(self) -> int:
        return self.exact.shape[0] - 1

    def _own_rows(self, slots: torch.Tensor) -> torch.Tensor:
        return _take_rows(self.exact, slots)

    def _own_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.exact)

    def param_count(self) -> int:
        return self.base.param_count() + self.exact.numel()


class ZeroRows(nn.Module):
    """The all-zero V x d table, the base under a LowRankRows that holds every remaining token
    (the SVD baseline with exact rows or a tier stores only the other rows' factors, not a zero
    row of P for each kept token). No parameters; its rows and logits are a zero scalar that the
    wrapper's select broadcasts."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self._shape = (num_embeddings, embedding_dim)
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self._shape[0]

    @property
    def embedding_dim(self) -> int:
        return self._shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.zero.expand(*self._shape)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.zero

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.zero

    def logits_t(self, flat: torch.Tensor) -> torch.Tensor:
        return self.zero

    def param_count(self) -> int:
        return 0


class LowRankRows(_SlotRows):
    """A middle tier between exact rows and the factored long tail: M chosen tokens (the next
    most frequent ones in the user's calibration text) read rank-r rows `coef[slot] @ basis` of
    their own low-rank table (`coef` M + 1 x r, `basis` r x d); every other token reads `base`
    (_SlotRows):

        rows(ids)  = where(slot[ids] < M, coef[slot[ids]] basis, base(ids))
        logits(h)  = where(slot < M, ((h basis^T) coef^T)[..., slot], base.logits(h))

    It costs (M + 1) r + r d parameters, and its head (M + 1) r + r d multiply-adds per position."""

    def __init__(self, base: nn.Module, ids: torch.Tensor, coef: torch.Tensor, basis: torch.Tensor):
        super().__init__()
        M = self._slots(base, ids)
        self.coef = nn.Parameter(torch.cat([coef.float().reshape(M, -1), torch.zeros(1, basis.shape[0])]))
        self.basis = nn.Parameter(basis.float().clone())

    @property
    def rows_kept(self) -> int:
        return self.coef.shape[0] - 1

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def _own_rows(self, slots: torch.Tensor) -> torch.Tensor:
        return _take_rows(self.coef, slots) @ self.basis

    def _own_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        # linears of the parameters as stored: XNNPACK delegates them
        return F.linear(F.linear(hidden, self.basis), self.coef)

    def param_count(self) -> int:
        return self.base.param_count() + self.coef.numel() + self.basis.numel()


class ExactRowsHead(_TiedHead):
    """The tied head of an ExactRows embedding."""


class LowRankRowsHead(_TiedHead):
    """The tied head of a LowRankRows embedding."""


def head_for(embedding: nn.Module) -> nn.Module:
    """The tied output head that reads `embedding` without forming its dense table."""
    if isinstance(embedding, ExactRows):
        return ExactRowsHead(embedding)
    if isinstance(embedding, LowRankRows):
        return LowRankRowsHead(embedding)
    return EntangledHead(embedding) if isinstance(embedding, EntangledEmbedding) else FactoredHead(embedding)


def describe(embedding: nn.Module) -> dict | None:
    """Config entry that lets a loader rebuild `embedding`'s shapes (None for nn.Embedding)."""
    if isinstance(embedding, ExactRows):
        return {"kind": "exact-rows", "rows": embedding.rows_kept, "base": describe(embedding.base)}
    if isinstance(embedding, ZeroRows):
        return {"kind": "zero-rows", "vocab": embedding.num_embeddings, "d": embedding.embedding_dim}
    if isinstance(embedding, LowRankRows):
        return {"kind": "low-rank-rows", "rows": embedding.rows_kept, "rank": embedding.rank,
                "base": describe(embedding.base)}
    if isinstance(embedding, EntangledEmbedding):
        return {"kind": "entangled", "units_a": embedding.table_a.shape[0],
                "units_b": embedding.table_b.shape[0], "d1": embedding.table_a.shape[1],
                "d2": embedding.table_b.shape[1], "vocab": embedding.num_embeddings,
                "rank": embedding.coef.shape[1],
                **({} if embedding.basis is None else {"d": embedding.embedding_dim}),
                **({} if embedding.table_c is None else {"units_c": embedding.table_c.shape[0],
                                                         "d3": embedding.table_c.shape[1]})}
    if isinstance(embedding, FactoredEmbedding):
        return {"kind": "factored", "vocab": embedding.num_embeddings, "rank": embedding.P.shape[1],
                "d": embedding.embedding_dim}
    return None


def build(entry: dict) -> nn.Module:
    """An empty module of the shapes `describe` recorded (weights are loaded afterwards)."""
    if entry["kind"] == "exact-rows":
        base = build(entry["base"])
        K = entry["rows"]
        return ExactRows(base, torch.arange(K), torch.zeros(K, base.embedding_dim))
    if entry["kind"] == "zero-rows":
        return ZeroRows(entry["vocab"], entry["d"])
    if entry["kind"] == "low-rank-rows":
        base = build(entry["base"])
        M, r = entry["rows"], entry["rank"]
        return LowRankRows(base, torch.arange(M), torch.zeros(M, r), torch.zeros(r, base.embedding_dim))
    if entry["kind"] == "entangled":
        V, R = entry["vocab"], entry["rank"]
        third = "units_c" in entry
        core = entry["d1"] * entry["d2"] * (entry["d3"] if third else 1)
        return EntangledEmbedding(torch.zeros(entry["units_a"], entry["d1"]),
                                  torch.zeros(entry["units_b"], entry["d2"]),
                                  torch.zeros(V, R, dtype=torch.long), torch.zeros(V, R, dtype=torch.long),
                                  torch.zeros(V, R),
                                  basis=torch.zeros(core, entry["d"]) if "d" in entry else None,
                                  table_c=torch.zeros(entry["units_c"], entry["d3"]) if third else None,
                                  index_c=torch.zeros(V, R, dtype=torch.long) if third else None)
    if entry["kind"] == "factored":
        return FactoredEmbedding(torch.zeros(entry["vocab"], entry["rank"]),
                                 torch.zeros(entry["rank"], entry["d"]))
    raise ValueError(f"unknown embedding kind {entry['kind']!r}")
