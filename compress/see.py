"""`see`: Sememe Entanglement Encoding of the token embedding (and a tied LM head), and the
`embed-svd` baseline (ALBERT-style factorisation) trained with the same budget.

Formulation (docs/see.md): e_v = (sum_r c[v, r] * A[ia[v, r]] (x) B[ib[v, r]]) P, with
- A: semantic units. Whole-word tokens get one rank term per WordNet sense (up to max_rank); the
  term's unit is the sense's hypernym ancestor at the depth that fits the knowledge budget, so
  words whose senses share an ancestor share that unit. Tokens WordNet does not cover (sub-words,
  numbers, punctuation, other scripts, words without senses) get data-driven units: k-means
  clusters of the original embeddings.
- B: sub-word/form units: k-means clusters of the original embeddings; a token's r-th term uses its
  r-th nearest cluster, so the terms of one token differ.
- C (order 3 only: A (x) B (x) C, d' = d1 d2 d3): a second form inventory, the same k-means rule
  on the next band of the table's principal components (B clusters the top 64).
- P (d' x d, basis = "principal"): the basis the tensor-product split is taken in, started at the
  table's top-d' principal directions and trained with the rest (its parameters count in the
  ratio); basis = "raw" splits the table's own coordinates (no P).
Training: stage 1 reconstructs the original rows (whole vocabulary; with `head_metric`, in the
metric of a tied LM head's input; with `input_metric`, in the metric of the output's sensitivity
to an input row, through a basis whitened in it) and then the original hidden states on the calibration data;
stage 2 distils the original model's outputs.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pocketformer.models.factored import (EntangledEmbedding, ExactRows, FactoredEmbedding,
                                          LowRankRows, ZeroRows, factor_dims, head_for, kron_sum)
from pocketformer.compress.recovery import (TeacherReplay, _kd_loss, _layer_outputs_hooks,
                                             check_device, check_precision, device_name,
                                             next_token_loss, on_device, resolve_precision,
                                             schedule_progress, steps_for_passes, student_autocast)
from pocketformer.compress.registry import Calibration, register
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel, layer_hidden
from pocketformer.progress import progress, say

INVENTORIES = ("wordnet", "random")
KNOWLEDGE_ROLES = ("fixed", "init")
BASES = ("principal", "raw")
TEACHERS = ("incoming", "original")
BASIS_BUDGET_SHARE = 1 / 8           # a default principal basis takes at most this share of the budget
FORM_BAND = 64                       # principal components a form inventory is clustered on
UNSPENT_WARNING = 0.95               # say so when the unit tables cannot use this share of the budget


@dataclass
class EmbeddingStages:
    """The options `see` and its `embed-svd` baseline share: the ratio, how stage 1a weighs and
    keeps rows, and stages 1b and 2 (budgets, losses, what trains), so both get the same."""
    ratio: float = 10.0              # embedding (+ tied head) parameters / new parameters
    frequency_weight: float = 0.0    # stage 1a: row v counts 1 + this x (its calibration count
                                     # / the mean count of the tokens that occur); embed-svd: a
                                     # row-weighted truncated SVD
    exact_share: float = 0.0         # share of the parameter budget spent on exact rows for the
                                     # calibration text's most frequent tokens (ExactRows)
    tier_share: float = 0.0          # share of the budget spent on a rank-tier_rank table for the
                                     # next most frequent tokens (LowRankRows), fitted in the metric
    tier_rank: int = 192             # the rank of that tier's rows (below d)
    head_metric: float = 0.0         # tied heads: fit the rows in (1 - this) I + this x the head
                                     # input's second moment (see: its low-rank form; embed-svd:
                                     # the full d x d metric)
    head_metric_batches: int | None = None  # calibration batches that moment is measured on,
                                     # evenly spaced over them (default: every batch): the pass
                                     # is a forward of the whole model per batch
    input_metric: float = 0.0        # fit the rows in (1 - this) I + this x the metric of the
                                     # model's output's sensitivity to an input row (E[J^T J] on
                                     # the calibration text, Gaussian probes); see: by whitening
                                     # its principal basis, embed-svd: exactly
    input_metric_batches: int = 16   # calibration batches its probes run on (one probe each)
    hidden_minutes: float = 0.5      # stage 1b: hidden-state reconstruction on calibration data
    distill_minutes: float = 2.0     # stage 2: output distillation
    max_passes: float | None = None  # stages 1b and 2: each stops after this many passes over
                                     # the calibration batches even if time is left; the
                                     # learning-rate schedule then follows whichever of time and
                                     # passes is further along (as layered-prune's
                                     # recovery_max_passes): with minutes to spare the result is
                                     # the same on any machine
    distill_hidden_weight: float = 0.0  # stage 2: + this x stage 1b's last-hidden-state loss
    distill_relation_weight: float = 0.0  # stage 2, encoders: + this x the mean squared difference
                                     # of the batch's sentence-to-sentence cosine matrices
    distill_ce_weight: float = 0.0   # stage 2, decoders: + this x the next-token cross-entropy
                                     # on the calibration text (as layered-prune's recovery's
                                     # ce_weight: it adapts the model to that text's domain)
    row_anchor: float = 0.0          # stages 1b and 2: + this x the relative row error of
                                     # anchor_rows rows drawn at random from the whole vocabulary
    anchor_rows: int = 4096
    train_scope: str = "embedding"   # stages 1b and 2 train: embedding | norms (+ every norm's
                                     # gain and bias) | all (+ every other weight of the model)
    distill_lr: float = 1e-3         # stages 1b and 2 (the embedding's parameters)
    scope_lr: float = 1e-4           # stages 1b and 2: the parameters train_scope adds
    precision: str = "fp32"          # stages 1b and 2: fp32 | bf16 | auto (auto: bf16 where the
                                     # device runs it natively, else fp32; the student's forward and
                                     # backward under bf16 autocast on `device`; the teacher,
                                     # parameters, optimizer and losses stay fp32)
    device: str = "cpu"              # stages 1b and 2 (student and teacher) and the head
                                     # metric's pass run on this torch device: cpu | cuda |
                                     # cuda:N; stage 1a and the result stay on the CPU
    teacher: str = "incoming"        # stages 1b and 2 distil from: incoming (the model as this step
                                     # receives it) | original (in a recipe, the model as it was
                                     # before the recipe's first step; alone, the same model)
    seed: int = 0

    def validate(self) -> None:
        if self.ratio <= 1:
            raise BadInputError("must be > 1", field="ratio")
        if self.frequency_weight < 0:
            raise BadInputError("must be >= 0", field="frequency_weight")
        _check_exact_share(self.exact_share)
        _check_tier(self.exact_share, self.tier_share, self.tier_rank)
        _check_head_metric(self.head_metric)
        _check_input_metric(self.input_metric, self.head_metric)
        if self.input_metric_batches < 1:
            raise BadInputError("must be >= 1", field="input_metric_batches")
        if self.head_metric_batches is not None and self.head_metric_batches < 1:
            raise BadInputError("must be >= 1 (leave it out for every batch)", field="head_metric_batches")
        _check_hidden_weight(self.distill_hidden_weight)
        if self.max_passes is not None and not self.max_passes > 0:
            raise BadInputError("must be > 0 (passes over the calibration batches; leave it out "
                                "for time alone)", field="max_passes")
        if not 0 <= self.distill_relation_weight <= 1000:
            raise BadInputError("must be in [0, 1000]", field="distill_relation_weight")
        if not 0 <= self.distill_ce_weight <= 100:
            raise BadInputError("must be in [0, 100]", field="distill_ce_weight")
        _check_anchor(self.row_anchor, self.anchor_rows)
        _check_scope(self.train_scope, self.scope_lr)
        check_precision(self.precision, "precision")
        check_device(self.device, "device")
        if self.teacher not in TEACHERS:
            raise BadInputError(f"expected one of {', '.join(TEACHERS)}", field="teacher")

    def needs_calibration(self) -> bool:
        return (self.hidden_minutes > 0 or self.distill_minutes > 0 or self.exact_share > 0
                or self.tier_share > 0
                or self.head_metric > 0 or self.input_metric > 0)


@dataclass
class SEEConfig(EmbeddingStages):
    order: int = 2                   # Kronecker factors per term: 2 (A (x) B) or 3 (A (x) B (x) C)
    d1: int | None = None            # first factor's size (d' = d1 * d2 [* d3]); default: the most
                                     # square (cube-like) split of the width
    basis: str = "principal"         # principal | raw: the basis the Kronecker split is taken in
    basis_dim: int | None = None     # d' of a principal basis; default: d when its d x d matrix
                                     # takes at most BASIS_BUDGET_SHARE of the budget, else the
                                     # largest near-square d1 x d2 that does
    max_rank: int | None = None      # rank terms per token; default 4, or 2 above ratio 20
    inventory: str = "wordnet"       # wordnet | random (same structure, units assigned at random)
    knowledge_share: float = 0.6     # share of the A table reserved for WordNet units
    fill_rank: bool = False          # a token with fewer knowledge terms than max_rank gets the
                                     # rest from its nearest data-driven A units (its coefficient
                                     # slots are in the budget either way)
    b_share: float = 0.5             # share of the unit-table parameters that goes to B
    reassign_rounds: int = 3         # stage 1a: rounds of choosing each term's form (B, C) and A
                                     # units by the fit after the sweeps (reassign_units)
    knowledge_role: str = "init"     # init: WordNet gives the starting assignment and the rounds
                                     # may move any A unit to any unit; fixed: they never move a
                                     # WordNet term's A unit (docs/see.md "WordNet as the starting
                                     # assignment only")
    balance_units: bool = True       # stage 1a puts the units in one gauge (balance_units): every
                                     # unit at its table's median norm, the scale in the coefficients
    reconstruct_steps: int = 500     # stage 1a: Adam steps after the least-squares sweeps
    lr: float = 3e-3                 # stage 1a

    def validate(self) -> None:
        super().validate()
        if self.order not in (2, 3):
            raise BadInputError("expected order 2 (d = d1 x d2) or 3 (d = d1 x d2 x d3)", field="order")
        if self.inventory not in INVENTORIES:
            raise BadInputError(f"expected one of {', '.join(INVENTORIES)}", field="inventory")
        if self.basis not in BASES:
            raise BadInputError(f"expected one of {', '.join(BASES)}", field="basis")
        if self.input_metric > 0 and self.basis != "principal":
            raise BadInputError("needs basis = principal: see applies the metric through its basis",
                                field="input_metric")
        if self.basis_dim is not None and (self.basis != "principal" or self.basis_dim < 1):
            raise BadInputError("a positive width, with basis = principal", field="basis_dim")
        if not 0 <= self.reassign_rounds <= 20:
            raise BadInputError("must be in 0..20", field="reassign_rounds")
        if self.knowledge_role not in KNOWLEDGE_ROLES:
            raise BadInputError(f"expected one of {', '.join(KNOWLEDGE_ROLES)}", field="knowledge_role")
        if self.max_rank is not None and not 1 <= self.max_rank <= 16:
            raise BadInputError("must be in 1..16", field="max_rank")
        if not 0 <= self.knowledge_share < 1:
            raise BadInputError("must be in [0, 1)", field="knowledge_share")
        if not 0 < self.b_share < 1:
            raise BadInputError("must be in (0, 1)", field="b_share")
        if min(self.hidden_minutes, self.distill_minutes) < 0 or self.reconstruct_steps < 0:
            raise BadInputError("budgets must be >= 0", field="distill_minutes")

    def rank(self) -> int:
        return self.max_rank or (4 if self.ratio <= 20 else 2)


# ---- vocabulary and units -----------------------------------------------------------------------

_WORD = re.compile(r"^[A-Za-z]{2,}$")


def word_of(token: str, family: str) -> str | None:
    """The whole word a token spells, or None for sub-words, numbers, punctuation, specials."""
    if family == "bert":
        return token if _WORD.match(token) else None          # "##ing" is a continuation piece
    if token.startswith("Ġ") and _WORD.match(token[1:]):      # byte-level BPE: leading space marker
        return token[1:]
    return None


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, dim: int = 64, skip: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means in the top-`dim` principal subspace (after the first `skip` components;
    random seeding); returns (centroids in that subspace, assignment). Projecting first makes
    20k clusters of 30k rows take seconds; stopping once an assignment repeats (MiniLM's table:
    after 4-5 of the 10 sweeps) returns exactly what the remaining sweeps would. After the first
    sweep only the centroids that moved are compared with every row (`_reassign`): the same
    assignment as a full sweep up to float rounding (a cosine is summed in another GEMM shape,
    which can flip a tie to the last bit), at a fraction of its cost once few clusters change."""
    g = torch.Generator().manual_seed(seed)
    x = _project(x, dim, skip)
    n = x.shape[0]
    k = min(k, n)
    cent = x[torch.randperm(n, generator=g)[:k]].clone()
    best, assign = _row_max(x, cent)         # each row's highest cosine and its centroid
    for sweep in range(iters):
        if sweep:
            moved = (cent != old).any(-1)
            if not bool(moved.any()):
                break          # a fixed point: the same centroids give the same assignment
            new_best, new_assign = _reassign(x, cent, moved, best, assign)
            if torch.equal(new_assign, assign):
                break          # a fixed point: the same assignment gives the same centroids again
            best, assign = new_best, new_assign
        old = cent
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(-1)
        empty = counts.squeeze(-1) == 0
        cent = torch.where(empty.unsqueeze(-1), cent, sums / counts.clamp(min=1))
        cent = nn.functional.normalize(cent, dim=-1)
    return cent, assign


def _row_max(x: torch.Tensor, cols: torch.Tensor, absolute: bool = False, chunk: int = 32
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of x (n x d), the largest x . c over the rows c of `cols` (m x d), or the
    largest |x . c| with `absolute`, and the first column that has it. The n x m products are
    made `chunk` rows at a time into one reused buffer small enough to stay in the core's cache
    (32 rows x 20,000 columns is 2.6 MB), so the reduction reads them from cache, not memory:
    4096-row chunks, squared and divided out of cache, made SEE's reassignment round on MiniLM
    4x slower (docs/see.md, "Reassignment cost")."""
    n = x.shape[0]
    cols_t = cols.T.contiguous()
    buf = torch.empty(min(chunk, n), cols_t.shape[1])
    top, arg = torch.empty(n), torch.empty(n, dtype=torch.long)
    for i in range(0, n, chunk):
        out = buf[:min(chunk, n - i)]
        torch.mm(x[i:i + chunk], cols_t, out=out)
        top[i:i + chunk], arg[i:i + chunk] = (out.abs_() if absolute else out).max(-1)
    return top, arg


def _reassign(x: torch.Tensor, cent: torch.Tensor, moved: torch.Tensor, best: torch.Tensor,
              assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment a full sweep over `cent` would give, when only the `moved` centroids
    changed since (`best`, `assign`) were found. A row whose centroid stayed keeps it unless a
    moved one beats it (or ties it at a lower index): the kept centroids' maximum is still its
    `best`. A row whose centroid moved takes the best moved one if that is above its old `best`,
    which bounds every kept centroid; otherwise it is compared with all of them again."""
    cols = moved.nonzero().squeeze(-1)
    m, j = _row_max(x, cent[cols])
    j = cols[j]
    own = moved[assign]
    above = m > best
    redo = (own & ~above).nonzero().squeeze(-1)
    take = own | above | ((m == best) & (j < assign))
    best, assign = torch.where(take, m, best), torch.where(take, j, assign)
    if len(redo):
        best[redo], assign[redo] = _row_max(x[redo], cent)
    return best, assign


def _project(x: torch.Tensor, dim: int, skip: int = 0) -> torch.Tensor:
    x = x.float()
    centered = x - x.mean(0)
    if x.shape[1] > dim or skip:
        _, _, V = torch.linalg.svd(centered[: min(len(x), 20000)], full_matrices=False)
        centered = centered @ V[skip:skip + dim].T
    return nn.functional.normalize(centered, dim=-1)


def _nearest(x: torch.Tensor, cent: torch.Tensor, r: int, skip: int = 0) -> torch.Tensor:
    x = _project(x, cent.shape[1], skip)
    return torch.cat([(x[i:i + 4096] @ cent.T).topk(r, dim=-1).indices for i in range(0, len(x), 4096)])


@dataclass
class Plan:
    index_a: torch.Tensor      # V x R
    index_b: torch.Tensor      # V x R
    active: torch.Tensor       # V x R bool: which terms a token uses (its rank)
    units_a: int
    units_b: int
    knowledge_units: int
    covered_tokens: int
    stats: dict
    index_c: torch.Tensor | None = None    # V x R, order 3
    units_c: int = 0
    knowledge: torch.Tensor | None = None  # V x R bool: the terms whose A unit is a WordNet unit
                                           # (for the random inventory, the same terms)


def budget(V: int, d: int, dims: tuple[int, ...], ratio: float, R: int, b_share: float = 0.5,
           reserved: int = 0) -> tuple[int, ...]:
    """Unit counts (U_a, U_b[, U_c]) whose tables (widths `dims`) plus the V x R coefficients fit
    V d / ratio parameters less `reserved` (exact rows, a basis), a `b_share` of the table
    parameters going to the form tables (split evenly between B and C at order 3)."""
    total = V * d / ratio - V * R - reserved
    if total <= sum(dims):
        raise BadInputError(f"ratio {ratio:g} cannot be met: the {V} x {R} coefficients alone need "
                            f"{V * R:,} of the {int(V * d / ratio):,} parameters allowed"
                            + (f" ({reserved:,} already go to exact rows or a principal basis)" if reserved else "") + "; "
                            "lower the ratio or max_rank", field="ratio")
    form = len(dims) - 1
    return (max(1, int(total * (1 - b_share) / dims[0])),
            *(max(1, int(total * b_share / form / dk)) for dk in dims[1:]))


def plan_units(tokens: list[str], family: str, E: torch.Tensor, dims: tuple[int, ...], cfg: SEEConfig,
               wordnet=None, exact: torch.Tensor | None = None, width: int | None = None,
               reserved: int = 0, kept_params: int | None = None) -> Plan:
    """Units and terms for every token; tokens in `exact` (kept as exact rows, or in a low-rank
    tier) get no terms and their rows' parameters are taken from the budget first (`kept_params`;
    default: (K + 1) d for K exact rows). `E` holds the rows to encode (a principal basis'
    coordinates, d1 d2 [d3] wide, `dims` the factors); `width` is the table's own width d that
    the ratio and the exact rows refer to (default: E's), `reserved` parameters already spent
    (the basis)."""
    V = E.shape[0]
    d = width or E.shape[1]
    R = cfg.rank()
    n_exact = 0 if exact is None else int(exact.numel())
    is_exact = torch.zeros(V, dtype=torch.bool)
    if n_exact:
        is_exact[exact] = True
    table_units = budget(V, d, dims, cfg.ratio, R, cfg.b_share,
                         reserved=(kept_params if kept_params is not None
                                   else (n_exact + 1) * d if n_exact else 0) + reserved)
    Ua = table_units[0]
    index_a = torch.zeros(V, R, dtype=torch.long)
    active = torch.zeros(V, R, dtype=torch.bool)
    senses: dict[int, list[tuple[str, ...]]] = {}
    if cfg.inventory == "wordnet" or cfg.inventory == "random":
        # The random baseline keeps the WordNet structure (which tokens get how many terms) and
        # only assigns the units at random, so the comparison isolates the knowledge.
        if wordnet is None:
            from pocketformer.compress import wordnet as wn
            wordnet = wn.load()
        for v, tok in enumerate(tokens):
            w = word_of(tok, family)
            if w is None or is_exact[v]:
                continue
            chains = [wordnet.ancestors(s.key) for s in wordnet.senses(w)[:R]]
            if chains:
                senses[v] = chains
    K = int(cfg.knowledge_share * Ua) if senses else 0
    # Deepest cut of the hypernym chains whose distinct units fit K: depth counted from the root.
    unit_of: dict[str, int] = {}
    depth_used = None
    if K:
        max_depth = max(len(c) for chains in senses.values() for c in chains)
        for depth in range(max_depth, -1, -1):
            units = {c[max(0, len(c) - 1 - depth)] for chains in senses.values() for c in chains}
            if len(units) <= K:
                depth_used = depth
                unit_of = {u: i for i, u in enumerate(sorted(units))}
                break
    if K and depth_used is None:
        # Even the roots do not fit (adjectives and adverbs have no hypernyms, so every one of
        # their synsets is a root): keep the K roots shared by most senses; senses under the
        # others fall back to data-driven units.
        depth_used = 0
        counts: dict[str, int] = {}
        for chains in senses.values():
            for c in chains:
                counts[c[-1]] = counts.get(c[-1], 0) + 1
        kept = sorted(counts, key=lambda u: (-counts[u], u))[:K]
        unit_of = {u: i for i, u in enumerate(sorted(kept))}
    covered = 0
    for v, chains in senses.items():
        if depth_used is None:
            break
        units = [unit_of.get(c[max(0, len(c) - 1 - depth_used)]) for c in chains]
        units = [u for u in units if u is not None]
        for r, u in enumerate(units):
            index_a[v, r] = u
            active[v, r] = True
        covered += bool(units)
    knowledge_units = len(unit_of)
    knowledge = active.clone()
    # Data-driven A units for everything else: k-means of the original rows.
    rest = [v for v in range(V) if not active[v, 0] and not is_exact[v]]
    n_data = max(1, Ua - knowledge_units)
    if rest:
        cent_a, _ = kmeans(E[rest], n_data, seed=cfg.seed)
        near = _nearest(E[rest], cent_a, min(2, R, len(cent_a)))
        for j, v in enumerate(rest):
            for r in range(near.shape[1]):
                index_a[v, r] = knowledge_units + int(near[j, r])
                active[v, r] = True
    units_a = knowledge_units + (len(cent_a) if rest else 0)
    if units_a < Ua:
        # k-means makes at most one cluster per row: when A's data-driven part hits that cap
        # (small factors at order 3 buy more units than there are uncovered tokens), the A budget
        # left over goes to the form tables, which are capped the same way (at V)
        spare = (Ua - units_a) * dims[0] / (len(dims) - 1)
        table_units = (units_a, *(u + int(spare / dk) for u, dk in zip(table_units[1:], dims[1:])))
    filled = 0
    if cfg.fill_rank and rest:
        # The V x R coefficients are paid for whether a slot is on or not: the slots a token's
        # senses leave free take its nearest data-driven units (ranked by the same cosine as
        # the k-means), skipping units it already uses.
        # A token's terms occupy its first slots, so the next free slot is its rank.
        short = [v for v in range(V) if not is_exact[v] and int(active[v].sum()) < R]
        if short:
            near = _nearest(E[short], cent_a, min(R, len(cent_a)))
            for j, v in enumerate(short):
                r = int(active[v].sum())
                used = set(index_a[v, :r].tolist())
                for u in (knowledge_units + u for u in near[j].tolist()):
                    if r == R:
                        break
                    if u not in used:
                        index_a[v, r], active[v, r] = u, True
                        r += 1
                        filled += 1
    if cfg.inventory == "random":
        g = torch.Generator().manual_seed(cfg.seed + 1)
        index_a = torch.randint(0, units_a, (V, R), generator=g)
    index_b, n_b = _form_units(E, is_exact, table_units[1], R, seed=cfg.seed + 2)
    index_c, n_c = None, 0
    if len(dims) == 3:
        # a second form inventory from the next band of principal components, so a token's B
        # and C units describe different parts of its row (at most the top 64 + 64)
        skip = min(FORM_BAND, E.shape[1] // 2)
        index_c, n_c = _form_units(E, is_exact, table_units[2], R, seed=cfg.seed + 3, skip=skip,
                                   dim=min(FORM_BAND, E.shape[1] - skip))
    if n_exact:
        active[exact] = False
    ranks = active.sum(1).float()
    stats = {"vocab": V, "knowledge_covered_tokens": covered,
             "knowledge_coverage": covered / V, "knowledge_units": knowledge_units,
             "hypernym_depth": depth_used, "data_units_a": units_a - knowledge_units,
             "units_a": units_a, "units_b": n_b, **({"units_c": n_c} if index_c is not None else {}),
             "max_rank": R,
             "mean_rank": float(ranks.mean()),
             "rank_histogram": torch.bincount(ranks.long(), minlength=R + 1).tolist(),
             "exact_rows": n_exact, "filled_terms": filled}
    return Plan(index_a, index_b, active, units_a, n_b, knowledge_units, covered, stats, index_c, n_c,
                knowledge)


def _form_units(E: torch.Tensor, is_exact: torch.Tensor, k: int, R: int, seed: int, skip: int = 0,
                dim: int = FORM_BAND) -> tuple[torch.Tensor, int]:
    """(V x R indices, unit count): a cosine k-means of the rows into k clusters (components
    skip..skip+dim); term r of a token uses its r-th nearest cluster."""
    cent, _ = kmeans(E[~is_exact], k, seed=seed, dim=dim, skip=skip)
    index = _nearest(E, cent, min(R, len(cent)), skip)
    if index.shape[1] < R:
        index = torch.cat([index, index[:, :1].expand(-1, R - index.shape[1])], 1)
    return index, len(cent)


# ---- training -----------------------------------------------------------------------------------

def solve_unit_rows(table: torch.Tensor, index: torch.Tensor, num: torch.Tensor,
                    den: torch.Tensor) -> None:
    """ALS's closed-form update of one unit table, in place: each unit row becomes the sum of
    its terms' numerators (`num`, (V R) x d_k) over the sum of their denominators (`den`, V x R:
    c^2 times the token weight times the squared norms of the term's other factors). Units no
    active term uses keep their row."""
    num_t = torch.zeros_like(table).index_add_(0, index.reshape(-1), num)
    den_t = torch.zeros(table.shape[0]).index_add_(0, index.reshape(-1), den.reshape(-1))
    used = den_t > 1e-12
    table[used] = num_t[used] / den_t[used].unsqueeze(-1)


@torch.no_grad()
def als(emb: EntangledEmbedding, E: torch.Tensor, active: torch.Tensor, iters: int = 10,
        weights: torch.Tensor | None = None) -> list[float]:
    """Alternating least squares on ||sum_r c A[ia] (x) B[ib] [(x) C[ic]] - e||^2 over all tokens:
    each sweep solves, in closed form, every row of each unit table in turn, then every
    coefficient, each against the residual that leaves its own term out (block coordinate
    descent; the error never rises). With `weights` (V), token v's squared error counts w_v times
    (the unit updates weight each token's share; a token's own coefficients are unaffected).

    No V x R x d tensor of terms is formed: a term's residual is the token's residual D_v plus
    the term itself, so contracting it with the other factors is D_v contracted with them plus
    c f_k times their squared norms; and the Gram matrix of a token's terms is, entry by entry,
    the product of its factors' inner products (Kronecker products multiply inner products)."""
    V, R = emb.index_a.shape
    dims = emb.dims
    M = E.view(V, *dims).float()
    mask = active.float()
    errors = []
    w = torch.ones(V) if weights is None else weights.float()
    norm = float((w.unsqueeze(-1) * E ** 2).sum())
    letters = "ijk"[:len(dims)]

    def factors():
        return [t[i] for t, i in zip(emb.tables, emb.indices)]          # V R d_k each

    for _ in range(iters):
        c = emb.coef * mask                                               # fixed until the coef solve
        cw = c * w.unsqueeze(-1)                                          # token weights in the sums
        for k, (table, index) in enumerate(zip(emb.tables, emb.indices)):
            f = factors()
            D = M - kron_sum(emb.coef, f)                                 # V d1 d2 [d3]
            others = [x for j, x in enumerate(f) if j != k]
            spec = (f"v{letters}," + ",".join(f"vr{x}" for j, x in enumerate(letters) if j != k)
                    + f"->vr{letters[k]}")
            norms = torch.ones_like(c)                                    # prod of others' |f|^2
            for x in others:
                norms = norms * (x ** 2).sum(-1)
            own = (emb.coef * norms).unsqueeze(-1) * f[k]
            num = (cw.unsqueeze(-1) * (torch.einsum(spec, D, *others) + own)).reshape(-1, dims[k])
            solve_unit_rows(table, index, num, cw * c * norms)
        # coefficients: one token at a time is a small R x R least-squares problem
        f = factors()
        gram = torch.ones(V, R, R)
        for x in f:
            gram = gram * (x @ x.transpose(1, 2))
        gram = gram * (mask.unsqueeze(-1) * mask.unsqueeze(1)) + 1e-6 * torch.eye(R)
        rhs = torch.einsum(f"v{letters}," + ",".join(f"vr{x}" for x in letters) + "->vr", M, *f) * mask
        emb.coef.copy_(torch.linalg.solve(gram, rhs) * mask)
        errors.append(float((w.unsqueeze(-1) * (emb.rows(torch.arange(V)) - E) ** 2).sum() / norm))
    return errors


@torch.no_grad()
def reassign_units(emb: EntangledEmbedding, E: torch.Tensor, active: torch.Tensor,
                   fixed_a: torch.Tensor | None = None, data_from: int = 0, chunk: int = 32) -> int:
    """One round of choosing units by the fit (the encoding step of additive quantisation, here
    for Kronecker terms): for each term r and each factor k in turn, every token's unit in table k
    becomes the one that, with the term's other factors kept and its coefficient re-solved, best
    fits the token's residual without that term. With D_r the residual plus the term, f_j its
    other factors and y = D_r contracted with them, unit u leaves ||D_r||^2 - (y . u)^2 /
    (|u|^2 prod_j |f_j|^2), so the best unit maximises (y . u)^2 / |u|^2 and its coefficient is
    y . u / (|u|^2 prod_j |f_j|^2). A term moves only when that beats its own unit (so the error
    never rises) and only if it is active. Given `fixed_a` (the WordNet terms) and `data_from`
    (the first data-driven A unit), an A unit moves only if it is data-driven and only to a
    data-driven unit, so the knowledge assignment stays as WordNet gave it (knowledge_role
    fixed); without them any A unit may move to any unit (knowledge_role init). Returns how many
    (term, factor) units moved."""
    V, R = emb.index_a.shape
    dims = emb.dims
    M = E.reshape(V, *dims).float()
    tables, indices = emb.tables, emb.indices
    letters = "ijk"[:len(dims)]
    mask = active.float()
    D = M - kron_sum(emb.coef * mask, [t[i] for t, i in zip(tables, indices)])
    # a round moves indices and coefficients, never the units: their squared norms and their
    # directions u / |u| (the best unit maximises (y . u)^2 / |u|^2) once for every term
    unit_norms = [(t ** 2).sum(-1).clamp_min(1e-12) for t in tables]
    unit_dirs = [t / n.sqrt().unsqueeze(-1) for t, n in zip(tables, unit_norms)]
    moved = 0
    for r in range(R):
        # the residual without term r: the same for every factor of the term, since a move
        # changes only the term itself
        f = [t[i[:, r]] for t, i in zip(tables, indices)]                         # V d_j each
        D_r = D + kron_sum((emb.coef[:, r] * mask[:, r]).unsqueeze(-1), [x.unsqueeze(1) for x in f])
        for k, (table, index) in enumerate(zip(tables, indices)):
            lo = data_from if k == 0 else 0
            if lo >= table.shape[0]:          # no data-driven A units: every A unit is WordNet's
                continue
            others = [x for j, x in enumerate(f) if j != k]
            spec = (f"v{letters}," + ",".join(f"v{x}" for j, x in enumerate(letters) if j != k)
                    + f"->v{letters[k]}")
            y = torch.einsum(spec, D_r, *others)                                  # V d_k
            rest = torch.ones(V)
            for x in others:
                rest = rest * (x ** 2).sum(-1)
            norms = unit_norms[k]
            score, best = _row_max(y, unit_dirs[k][lo:], True, chunk)
            score, best = score ** 2, best + lo
            own = (y * table[index[:, r]]).sum(-1) ** 2 / norms[index[:, r]]
            move = active[:, r] & (score > own * (1 + 1e-6)) & (rest > 1e-12)
            if k == 0:
                move &= ~fixed_a[:, r] if fixed_a is not None else index[:, r] >= data_from
            if bool(move.any()):
                index[move, r] = best[move]
                u = table[best[move]]
                emb.coef[move, r] = (y[move] * u).sum(-1) / (norms[best[move]] * rest[move])
                moved += int(move.sum())
                f[k] = table[index[:, r]]
        D = D_r - kron_sum((emb.coef[:, r] * mask[:, r]).unsqueeze(-1), [x.unsqueeze(1) for x in f])
    return moved


@torch.no_grad()
def balance_units(emb: EntangledEmbedding) -> dict:
    """Fix the Kronecker sum's gauge. Scaling unit i of a table by s and every coefficient that
    uses it by 1 / s leaves every row unchanged, so least squares is free to let a unit drift to
    a huge norm while its partners or coefficients shrink (seen on SmolLM2: unit entries up to
    2e4, coefficients up to 440). Adam is not invariant to that gauge: its steps are about `lr`
    per entry, so a tiny factor of a large product moves by a large relative amount, and stages
    1b and 2 blew up. Every used unit is rescaled to its table's median unit norm and the scale
    goes into the coefficients: the rows are the same up to rounding. Returns the largest unit
    and coefficient entries before and after."""
    before = (max(float(t.abs().max()) for t in emb.tables), float(emb.coef.abs().max()))
    for table, index in zip(emb.tables, emb.indices):
        norms = table.norm(dim=1)
        used = norms > 0
        if not bool(used.any()):
            continue
        s = torch.where(used, norms[used].median() / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                        torch.ones_like(norms))
        table.mul_(s.unsqueeze(-1))
        emb.coef.div_(s[index])
    after = (max(float(t.abs().max()) for t in emb.tables), float(emb.coef.abs().max()))
    return {"unit_max_before": before[0], "coef_max_before": before[1],
            "unit_max_after": after[0], "coef_max_after": after[1]}


def fit_rows(emb: EntangledEmbedding, E: torch.Tensor, steps: int, lr: float, seed: int,
             active: torch.Tensor | None = None, weights: torch.Tensor | None = None,
             metric: tuple[float, torch.Tensor] | None = None, balance: bool = True,
             reassign: int = 0, fixed_a: torch.Tensor | None = None, data_from: int = 0) -> dict:
    """Stage 1a: minimise ||E_see - E||_F^2 / ||E||_F^2 over the whole vocabulary (each row's
    error counted `weights[v]` times when given): alternating least squares first, then
    full-batch Adam on all parameters jointly. With `metric` (c, W) the Adam phase measures a
    row error D as c ||D||^2 + ||D W||^2 (metric_lowrank; the least-squares sweeps stay plain).
    With `balance` the units are put in one gauge (balance_units) after the sweeps and again at
    the end, so the Adam steps here and in stages 1b and 2 are of comparable relative size. With
    `reassign` > 0 that many rounds follow the sweeps, each choosing the units by the fit
    (reassign_units; `fixed_a`, `data_from` as there) and then three more sweeps."""
    torch.manual_seed(seed)
    active = active if active is not None else emb.coef.detach() != 0
    als_errors = als(emb, E, active, weights=weights)
    moves = []
    for _ in progress(range(reassign), "SEE units", total=reassign) if reassign else ():
        moves.append(reassign_units(emb, E, active, fixed_a, data_from))
        als_errors += als(emb, E, active, iters=3, weights=weights)
    reassigned = {"reassigned_terms": moves} if reassign else {}
    gauge = {"gauge_after_sweeps": balance_units(emb)} if balance else {}
    opt = torch.optim.Adam([*emb.tables, emb.coef], lr=lr)
    w = (torch.ones(E.shape[0]) if weights is None else weights.float()).unsqueeze(-1)

    def sq(D: torch.Tensor) -> torch.Tensor:
        """Squared error per entry; in the metric, ||D W||^2 spread evenly over each row's d entries."""
        if metric is None:
            return D ** 2
        return metric[0] * D ** 2 + ((D @ metric[1]) ** 2).sum(-1, keepdim=True) / D.shape[-1]

    norm = float((w * sq(E)).sum())
    ids = torch.arange(E.shape[0])
    first = last = math.nan
    for step in progress(range(steps), "SEE rows", total=steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        loss = (w * sq(emb.rows(ids) - E)).sum() / norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
    with torch.no_grad():
        D = emb.rows(ids) - E
        rel = float((D ** 2).sum() / (E ** 2).sum())
        weighted = float((w * sq(D)).sum() / norm)
    if balance:
        gauge["gauge_at_end"] = balance_units(emb)
    return {"als_errors": [round(e, 4) for e in als_errors], **reassigned, "steps": steps,
            "loss_first": first, **gauge,
            "loss_last": last, "relative_error": rel,
            **({"weighted_relative_error": weighted} if weights is not None or metric is not None else {})}


def token_mask(batch) -> torch.Tensor:
    """Which positions of a calibration batch hold tokens (its attention mask where it has one)."""
    ids = batch[0]
    return batch[1].bool() if len(batch) > 1 and batch[1].shape == ids.shape else torch.ones_like(ids, dtype=torch.bool)


def token_counts(batches, V: int) -> torch.Tensor:
    """How often each token occurs in the calibration batches (padding excluded)."""
    n = torch.zeros(V)
    for batch in batches:
        mask = token_mask(batch)
        n.index_add_(0, batch[0][mask].reshape(-1), torch.ones(int(mask.sum())))
    return n


def row_weights(batches, V: int, strength: float) -> torch.Tensor | None:
    """Stage 1a's row weights from the calibration data: 1 + strength x count / mean count over
    the tokens that occur (padding excluded), so rows the user's text uses are fitted first and
    every other row still counts once. None when strength is 0 or there is no data."""
    if strength <= 0 or not batches:
        return None
    n = token_counts(batches, V)
    seen = n > 0
    if not seen.any():
        return None
    return 1 + strength * n / n[seen].mean()


def _check_exact_share(share: float) -> None:
    if not 0 <= share < 1:
        raise BadInputError("must be in [0, 1)", field="exact_share")


def _check_tier(exact_share: float, share: float, rank: int) -> None:
    if not 0 <= share < 1:
        raise BadInputError("must be in [0, 1)", field="tier_share")
    if exact_share + share >= 1:
        raise BadInputError(f"exact_share {exact_share:g} + tier_share {share:g} leave nothing for "
                            "the factored rows: their sum must be below 1", field="tier_share")
    if rank < 1:
        raise BadInputError("must be >= 1", field="tier_rank")


def calibration_counts(batches, V: int, share: float, field: str = "exact_share") -> torch.Tensor | None:
    """The token counts exact rows (and a low-rank tier) are chosen by (None when share is 0:
    no such rows)."""
    if share <= 0:
        return None
    if not batches:
        raise BadInputError("exact rows are chosen from the calibration text: give --calibration",
                            field=field)
    return token_counts(batches, V)


def exact_tokens(n: torch.Tensor | None, d: int, ratio: float, share: float) -> torch.Tensor | None:
    """The tokens that keep exact rows: the most frequent ones by the calibration counts `n`
    (calibration_counts), as many as `share` of the V d / ratio parameter budget pays for (d
    each; ties broken by token id). None without counts."""
    if n is None:
        return None
    V = n.numel()
    K = min(int(share * V / ratio), int((n > 0).sum()))
    if K < 1:
        raise BadInputError(f"share {share:g} of a {V * d / ratio:,.0f}-parameter budget buys no "
                            f"{d}-wide row", field="exact_share")
    order = torch.sort(-n, stable=True).indices                 # ties: lower token id first
    return order[:K].sort().values


@dataclass
class KeptRows:
    """The rows the factored part does not fit: exact rows for the calibration text's most
    frequent tokens (`exact`), then rank-`rank` rows for the next most frequent (`tier`)."""
    exact: torch.Tensor | None = None
    tier: torch.Tensor | None = None
    rank: int = 0

    @property
    def ids(self) -> torch.Tensor | None:
        parts = [t for t in (self.exact, self.tier) if t is not None]
        return torch.cat(parts).sort().values if parts else None

    def params(self, d: int) -> int:
        """What they cost: (K + 1) d for K exact rows, (M + 1) r + r d for an M-row tier."""
        n = 0 if self.exact is None else (self.exact.numel() + 1) * d
        return n + (0 if self.tier is None else (self.tier.numel() + 1 + d) * self.rank)


def kept_rows(batches, V: int, d: int, config: EmbeddingStages) -> tuple[torch.Tensor | None, KeptRows]:
    """(counts, kept): the calibration token counts (None without exact rows or a tier) and the
    tokens that keep exact rows (exact_share) or join the low-rank tier (tier_share): the most
    frequent first, then, after them, the next most frequent ones, as many rank-r rows as
    tier_share of the V d / ratio budget pays for once its r x d basis is paid (never more than
    the tokens the text uses)."""
    counts = calibration_counts(batches, V, config.exact_share + config.tier_share,
                                "exact_share" if config.exact_share > 0 else "tier_share")
    exact = exact_tokens(counts, d, config.ratio, config.exact_share) if config.exact_share > 0 else None
    if config.tier_share <= 0:
        return counts, KeptRows(exact)
    r = config.tier_rank
    if r >= d:
        raise BadInputError(f"must be below the embedding width {d} (a rank-{d} row is an exact row: "
                            "use exact_share)", field="tier_rank")
    order = torch.sort(-counts, stable=True).indices          # ties: lower token id first
    taken = torch.zeros(V, dtype=torch.bool)
    if exact is not None:
        taken[exact] = True
    order = order[~taken[order] & (counts[order] > 0)]
    M = min(int(config.tier_share * V * d / config.ratio / r) - d - 1, order.numel())
    if M < 1:
        raise BadInputError(f"share {config.tier_share:g} of a {V * d / config.ratio:,.0f}-parameter "
                            f"budget buys no rank-{r} row beyond its {r} x {d} basis"
                            + ("" if order.numel() else " (the calibration text has no token left)"),
                            field="tier_share")
    return counts, KeptRows(exact, order[:M].sort().values, r)


def tier_fit(rows: torch.Tensor, rank: int, root: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef, basis), M x r and r x d: the rank-r optimum of the tier's rows, in the metric
    M = L L^T when `root` = (L, L^-1) is given (the truncated SVD of rows L, its basis mapped
    back by L^-1)."""
    coef, basis = weighted_svd(rows if root is None else rows @ root[0], rank)
    return coef, (basis if root is None else basis @ root[1])


def with_basis(core: EntangledEmbedding, P: torch.Tensor) -> EntangledEmbedding:
    """`core` (fitted to the coordinates E P^T) as a module whose rows are its rows times P."""
    return EntangledEmbedding(core.table_a.detach(), core.table_b.detach(), core.index_a,
                              core.index_b, core.coef.detach(), core.padding_idx, basis=P,
                              table_c=None if core.table_c is None else core.table_c.detach(),
                              index_c=core.index_c)


def with_kept_rows(base: nn.Module, E: torch.Tensor, kept: KeptRows,
                   root: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """`base` (the factored rows) with the tier's low-rank rows (fitted by tier_fit in the metric
    `root`) and the exact rows on top: ExactRows(LowRankRows(base))."""
    module = base
    if kept.tier is not None:
        module = LowRankRows(module, kept.tier, *tier_fit(E[kept.tier], kept.rank, root))
    return module if kept.exact is None else ExactRows(module, kept.exact, E[kept.exact])


def fitted_rows(V: int, exact: torch.Tensor | None) -> torch.Tensor:
    """Mask of the rows the factored part fits: every row but the exact tokens'."""
    rest = torch.ones(V, dtype=torch.bool)
    if exact is not None:
        rest[exact] = False
    return rest


def _zero_rows(weights: torch.Tensor | None, V: int, exact: torch.Tensor | None) -> torch.Tensor | None:
    """Row weights with the exact tokens' rows left out of the fit of the factored part."""
    if exact is None:
        return weights
    w = torch.ones(V) if weights is None else weights.clone()
    w[exact] = 0
    return w


# ---- stage 1b/2 options: hidden-state weight, relations, row anchor, train scope ----------------

def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distillation for sentence embeddings `[B, d]`: the mean squared
    difference between the student's and the teacher's `B x B` matrices of cosines between the
    batch's sentences (the diagonal is 1 on both sides). STS scores a pair by exactly such a
    cosine, so this term weighs the errors that move pair similarities, where 1 - cos per
    sentence weighs every direction of error alike."""
    if student.dim() != 2:
        raise ValueError(f"expected sentence embeddings [B, d], got {tuple(student.shape)}")
    s = nn.functional.normalize(student.float(), dim=-1)
    t = nn.functional.normalize(teacher.float(), dim=-1)
    n = s.shape[0]
    return ((s @ s.T - t @ t.T) ** 2).sum() / max(1, n * (n - 1))


def _check_hidden_weight(w: float) -> None:
    if not 0 <= w <= 100:
        raise BadInputError("must be in [0, 100]", field="distill_hidden_weight")


def _check_anchor(w: float, rows: int) -> None:
    if not 0 <= w <= 100:
        raise BadInputError("must be in [0, 100]", field="row_anchor")
    if rows < 1:
        raise BadInputError("must be >= 1", field="anchor_rows")


class RowAnchor:
    """Stages 1b and 2 train the table on the calibration text's tokens only, and SEE's units
    are shared: a step that moves a unit for a calibration token also moves every other token
    that uses it. This term keeps the whole vocabulary near the original rows: `weight` x the
    relative error of `rows` rows drawn uniformly at random (a fresh draw each step, seeded)."""

    def __init__(self, module: nn.Module, E: torch.Tensor, weight: float, rows: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.module, self.E, self.weight = module, E.to(device), weight
        self.rows = min(rows, E.shape[0])
        self.gen = torch.Generator().manual_seed(seed)      # draws on the CPU on every device

    def loss(self) -> torch.Tensor:
        ids = torch.randperm(self.E.shape[0], generator=self.gen)[:self.rows].to(self.E.device)
        target = self.E[ids]
        return ((self.module(ids) - target) ** 2).sum() / (target ** 2).sum()


TRAIN_SCOPES = ("embedding", "norms", "all")


def _check_scope(scope: str, lr: float) -> None:
    if scope not in TRAIN_SCOPES:
        raise BadInputError(f"expected one of {', '.join(TRAIN_SCOPES)}", field="train_scope")
    if not lr > 0:
        raise BadInputError("must be > 0", field="scope_lr")


def trainable_groups(loaded: LoadedModel, module: nn.Module, cfg) -> list[dict]:
    """Adam's parameter groups for stages 1b and 2: the new embedding module at distill_lr, and
    what train_scope adds (every normalisation layer's gain and bias, or every other weight of
    the model) at scope_lr. The teacher is a copy taken before, so it never moves."""
    own = list(module.parameters())
    groups = [{"params": own, "lr": cfg.distill_lr}]
    if cfg.train_scope == "embedding":
        return groups
    seen = {id(p) for p in own}
    if cfg.train_scope == "norms":
        pool = [p for m in loaded.model.modules() if "Norm" in type(m).__name__
                for p in m.parameters(recurse=False)]
    else:
        pool = list(loaded.model.parameters())
    extra = []
    for p in pool:
        if id(p) not in seen:
            seen.add(id(p))
            extra.append(p)
    if extra:
        groups.append({"params": extra, "lr": cfg.scope_lr})
    return groups


# ---- the head-input metric (head_metric) ------------------------------------------------------

def _check_head_metric(beta: float) -> None:
    if not 0 <= beta <= 1:
        raise BadInputError("must be in [0, 1]", field="head_metric")


class _StopAfterLastLayer(Exception):
    """Raised by head_inputs' hook: the forward pass past the last layer is not needed."""


@torch.no_grad()
def head_inputs(loaded: LoadedModel, batches, label: str = "head inputs"):
    """Yield, batch by batch, the LM head's input h (the final-normed last hidden state, one row
    per position) of the model as it is now. Each batch runs up to the last layer only: a hook
    takes its output and stops the pass, so neither the logits (V per position) nor the layer
    inputs are computed or kept."""
    adapter = loaded.adapter
    module = adapter.export_module(loaded)
    last: dict = {}

    def take(mod, args, output):
        last["hidden"] = layer_hidden(output)
        raise _StopAfterLastLayer

    handle = adapter.layers(loaded.model)[-1].register_forward_hook(take)
    try:
        for batch in progress(batches, label, total=len(batches)):
            try:
                module(*batch)
            except _StopAfterLastLayer:
                pass
            yield adapter.output_features(loaded, last.pop("hidden"), batch)
    finally:
        handle.remove()


def second_moment(rows) -> torch.Tensor:
    """E[h h^T] over the rows of every tensor `rows` yields (accumulated in float64)."""
    C, n = None, 0
    for h in rows:
        h = h.double()
        C = h.T @ h if C is None else C + h.T @ h
        n += h.shape[0]
    return (C / n).float()


def head_moment(loaded: LoadedModel, batches, device: torch.device | str = "cpu") -> torch.Tensor:
    """C = E[h h^T] (d x d) of the LM head's input h over every calibration position
    (head_inputs), the passes run on `device`."""
    with on_device([loaded.model], batches, device) as placed:
        return second_moment(head_inputs(loaded, placed, "head moment")).cpu()


def row_metric(loaded: LoadedModel, batches, beta: float, device: torch.device | str = "cpu",
               max_batches: int | None = None) -> torch.Tensor | None:
    """The metric M that the table's rows are fitted in when a tied LM head reads them:
    ||e_hat - e||_M^2 = (e_hat - e) M (e_hat - e)^T with M = (1 - beta) I + beta C d / tr C.
    The head's logit error for a hidden state h is h (e_hat - e)^T, whose mean square over the
    calibration positions is exactly the C-metric; the identity part keeps the input side (the
    same table feeds the first layer) in the fit. None when beta is 0. With `max_batches` the
    moment is measured on that many of the batches, evenly spaced: a cost knob, since the pass
    is a forward per batch and fewer positions fit the head measurably worse (SmolLM2, 4 of 12
    batches: docs/see.md, the tier's real-model test)."""
    if beta <= 0:
        return None
    if not loaded.adapter.tied_head(loaded.model):
        raise BadInputError(f"needs a tied LM head; this {loaded.family} model has none",
                            field="head_metric")
    if not batches:
        raise BadInputError("the head metric is measured on the calibration text: give --calibration",
                            field="head_metric")
    batches = list(batches)
    if max_batches is not None and max_batches < len(batches):
        pick = torch.linspace(0, len(batches) - 1, max_batches).round().long().tolist()
        batches = [batches[i] for i in pick]
    return metric_from_moment(head_moment(loaded, batches, device), beta)


# ---- the input-sensitivity metric (input_metric) ----------------------------------------------

def _check_input_metric(beta: float, head_beta: float) -> None:
    if not 0 <= beta <= 1:
        raise BadInputError("must be in [0, 1]", field="input_metric")
    if beta > 0 and head_beta > 0:
        raise BadInputError("the rows are fitted in one metric: set head_metric or input_metric, "
                            "not both", field="input_metric")


def input_moment(loaded: LoadedModel, batches, seed: int, device: torch.device | str = "cpu",
                 max_batches: int = 16, probe=None) -> torch.Tensor:
    """C = E[J^T J] (d x d), J the Jacobian of the model's output (the sentence embedding of an
    encoder, the logits of a decoder) with respect to the vector the token table feeds in at one
    position: a row error D there moves the output by J D to first order, whose squared size is
    D J^T J D^T. Estimated with Gaussian probes: for z ~ N(0, I) over the output, g = J^T z (one
    backward pass per batch) has E[g g^T] = J^T J; averaged over every position of the first
    `max_batches` calibration batches (positions the output does not read, such as padding,
    give g = 0). `probe(out, generator) -> z` replaces the Gaussian probe: with E[z z^T] = F the
    estimate is E[J^T F J] (benchmarks/tied_table_probe.py tries the softmax's Fisher matrix)."""
    with on_device([loaded.model], list(batches)[:max_batches], device) as placed:
        return second_moment(input_gradients(loaded, placed, seed, probe)).cpu()


def gaussian_probe(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z ~ N(0, I) over the output: E[z z^T] = I."""
    return torch.randn(out.shape, generator=gen).to(out.device)


def input_gradients(loaded: LoadedModel, batches, seed: int, probe=None):
    """Yield, batch by batch, g = J^T z at every position (one row per position) for a fresh
    probe z over the batch's output (Gaussian unless `probe` says otherwise; input_moment); the hook that lets the backward
    pass stop at the table's output is removed afterwards."""
    adapter = loaded.adapter
    module = adapter.export_module(loaded)
    taken: dict = {}

    def take(mod, args, output):
        taken["x"] = output.detach().requires_grad_(True)
        return taken["x"]

    gen = torch.Generator().manual_seed(seed)
    handle = adapter.embeddings(loaded.model).register_forward_hook(take)
    try:
        for batch in progress(batches, "input metric", total=len(batches)):
            out = module(*batch)
            z = (probe or gaussian_probe)(out, gen)
            (g,) = torch.autograd.grad((out.float() * z).sum(), taken.pop("x"))
            yield g.reshape(-1, g.shape[-1])
    finally:
        handle.remove()


def input_metric(loaded: LoadedModel, batches, config: EmbeddingStages) -> torch.Tensor | None:
    """M = (1 - beta) I + beta C d / tr C with C = input_moment (None when beta is 0)."""
    if config.input_metric <= 0:
        return None
    if not batches:
        raise BadInputError("the input metric is measured on the calibration text: give --calibration",
                            field="input_metric")
    C = input_moment(loaded, batches, config.seed, config.device, config.input_metric_batches)
    return metric_from_moment(C, config.input_metric)


def fit_metric(loaded: LoadedModel, batches, config: EmbeddingStages
               ) -> tuple[str | None, torch.Tensor | None]:
    """The metric the rows are fitted in and the option that asked for it ("head_metric" or
    "input_metric", which are exclusive), or (None, None) for plain rows."""
    M = row_metric(loaded, batches, config.head_metric, config.device, config.head_metric_batches)
    if M is not None:
        return "head_metric", M
    M = input_metric(loaded, batches, config)
    return ("input_metric", M) if M is not None else (None, None)


def metric_from_moment(C: torch.Tensor, beta: float) -> torch.Tensor:
    d = C.shape[0]
    return (1 - beta) * torch.eye(d) + beta * C * (d / torch.trace(C))


def metric_root(M: torch.Tensor, floor: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with L L^T = M, eigenvalues floored at `floor` x their mean (a direction the
    head never reads must not blow up the inverse)."""
    lam, U = torch.linalg.eigh(M.double())
    lam = lam.clamp_min(floor * float(lam.mean()))
    return (U * lam.sqrt()).float(), (U / lam.sqrt()).T.float()


def metric_lowrank(M: torch.Tensor, k: int = 64) -> tuple[float, torch.Tensor, float]:
    """M ~ c I + W W^T: its top-k eigen-directions kept exactly (W = U_k sqrt(lam_k - c)) and
    the rest replaced by their mean eigenvalue c, so ||D||_M^2 ~ c ||D||^2 + ||D W||^2 costs
    V d k per evaluation instead of V d^2. Returns (c, W, share of M's trace the k directions
    hold)."""
    lam, U = torch.linalg.eigh(M.double())                  # ascending
    k = min(k, M.shape[0] - 1)
    c = float(lam[:-k].mean())
    top = (lam[-k:] - c).clamp_min(0)
    return c, (U[:, -k:] * top.sqrt()).float(), float(lam[-k:].sum() / lam.sum())


def basis_width(V: int, d: int, cfg: SEEConfig, kept_params: int = 0) -> int:
    """d': the width of the coordinates the Kronecker sum builds (d for the raw basis). A default
    principal basis is d x d when that takes at most BASIS_BUDGET_SHARE of the budget left after
    the kept rows (`kept_params`: exact rows, a low-rank tier), else the widest d1 x d2 [x d3]
    under that share (near-square or near-cube, largest factor <= 2 x smallest, or one the d1 the
    user gave splits)."""
    if cfg.basis == "raw":
        return d
    if cfg.basis_dim is not None:
        if cfg.basis_dim > d:
            raise BadInputError(f"at most the embedding width {d}", field="basis_dim")
        return cfg.basis_dim
    left = V * d / cfg.ratio - kept_params
    cap = int(BASIS_BUDGET_SHARE * left / d)
    if cap >= d:
        return d
    for w in range(cap, 0, -1):
        try:
            dims = factor_dims(w, cfg.order, cfg.d1)
        except ValueError:
            continue
        if cfg.d1 is not None or dims[-1] <= 2 * dims[0]:   # the user's d1: any split it makes
            return w
    raise BadInputError(f"ratio {cfg.ratio:g} cannot be met with a principal basis: the budget "
                        f"left ({left:,.0f} parameters) has no room for one; lower the ratio or use "
                        "basis = raw", field="ratio")


def principal_basis(E: torch.Tensor, width: int, root: tuple[torch.Tensor, torch.Tensor] | None = None,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, X): the table's top-`width` principal directions (right singular vectors of the
    uncentred table, width x d, orthonormal rows: the basis that keeps the most of ||E||^2 at that
    width) and the coordinates X = E P^T. With a metric M = L L^T (`root` = (L, L^-1)) the same in
    the metric: Vh, the top right singular vectors of E L, give P = Vh L^-1 and X = E L Vh^T, so
    that P M P^T = I and an error in the coordinates is an error of the same size in M. `rows`
    (a mask) names the rows the Kronecker sum will fit (the others keep exact rows): the
    directions are theirs, the coordinates every row's."""
    target = E if root is None else E @ root[0]
    _, _, Vh = torch.linalg.svd((target if rows is None else target[rows]).double(), full_matrices=False)
    Vh = Vh[:width].float()
    if root is None:
        return Vh, E @ Vh.T
    return Vh @ root[1], target @ Vh.T


def split_coordinates(E: torch.Tensor, config: SEEConfig, kept: KeptRows | None = None,
                      root: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
    """(P, X, dims): the principal basis (None for the raw one; in the metric L L^T when `root`
    = (L, L^-1) is given; fitted to the rows outside `kept`, the exact and tier rows), the
    coordinates X that the Kronecker sum builds (E itself for the raw basis; X P rebuilds E), and
    its split d' = d1 x d2 [x d3]."""
    kept = kept or KeptRows()
    width = basis_width(*E.shape, config, kept.params(E.shape[1]))
    try:
        dims = factor_dims(width, config.order, config.d1)
    except ValueError as e:
        field = "d1" if config.d1 is not None else "order"
        raise BadInputError(f"{e}: the width {width} the Kronecker sum builds does not factor so "
                            f"(order {config.order}" + (f", d1 {config.d1})" if config.d1 else ")"),
                            field=field) from None
    if config.basis != "principal":
        return None, E, dims
    return (*principal_basis(E, width, root, fitted_rows(E.shape[0], kept.ids)), dims)


def init_entangled(plan: Plan, dims: tuple[int, ...], E: torch.Tensor, seed: int) -> EntangledEmbedding:
    """Random unit tables (scaled so a term's product has about the rows' size) and coefficients
    1 on a token's active terms; stage 1a's least squares then fits them."""
    g = torch.Generator().manual_seed(seed)
    n = len(dims)
    scale = float(E.std()) ** (1 / n)
    units = [plan.units_a, plan.units_b] + ([plan.units_c] if n == 3 else [])
    A, B, *C = [torch.randn(u, dk, generator=g) * scale / math.sqrt(dk) * 2
                for u, dk in zip(units, dims)]
    coef = plan.active.float()
    return EntangledEmbedding(A, B, plan.index_a, plan.index_b, coef,
                              table_c=C[0] if C else None, index_c=plan.index_c)


def _train_against_teacher(loaded: LoadedModel, teacher: LoadedModel, groups: list[dict], batches,
                           minutes: float, seed: int, loss_kind: str, label: str,
                           hidden_weight: float = 0.0, anchor: RowAnchor | None = None,
                           precision: str = "fp32", device: torch.device | None = None,
                           relation_weight: float = 0.0, replay: TeacherReplay | None = None,
                           ce_weight: float = 0.0, max_passes: float | None = None) -> dict:
    """Train the Adam parameter `groups` (each with its own "lr", decaying linearly to 0) for
    `minutes` of wall time; every tensor's requires_grad is as it was afterwards. 'hidden'
    matches the last hidden state, 'output' matches the output (KL of next-token distributions,
    or 1 - cos of embeddings), plus `hidden_weight` x the 'hidden' loss when that is > 0, plus
    `relation_weight` x `relation_loss` of the embeddings when that is > 0, plus `ce_weight` x
    the next-token cross-entropy on the batch's own text (decoders) when that is > 0, plus
    the `anchor`'s row term when there is one. With `max_passes` it also stops after that many
    passes over the batches (max_steps), and the linear decay follows whichever of time and steps
    is further along. With `precision` "bf16" the student's forward
    (and so its backward) runs under bf16 autocast; its outputs are taken back to fp32 for
    the losses. Both models and the `batches` are on `device` already (the CPU when None).
    The teacher's work on a batch is kept by `replay` (a new one when None) for later steps on
    it; the record counts the teacher forwards run and the batches replayed."""
    if minutes <= 0 or not batches:
        return {"steps": 0, "seconds": 0.0}
    device_type = (device or torch.device("cpu")).type
    asked, precision = precision, resolve_precision(precision, torch.device(device_type), label)
    adapter = loaded.adapter
    s_module = adapter.export_module(loaded)
    replay = TeacherReplay(teacher) if replay is None else replay
    live, replayed = replay.live, replay.replayed
    store: dict = {}                  # the student's last layer output, when a loss reads it
    wants_hidden = loss_kind == "hidden" or hidden_weight > 0
    hooks = _layer_outputs_hooks(adapter.layers(loaded.model), [-1], store) if wants_hidden else []
    groups = [{**g, "base_lr": g["lr"]} for g in groups]
    tensors = [p for g in groups for p in g["params"]]
    flags = [p.requires_grad for p in tensors]
    for p in tensors:
        p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    budget_s = minutes * 60
    max_steps = steps_for_passes(max_passes, len(batches))
    start = time.perf_counter()
    steps = 0
    stopped_by = None
    losses, anchor_losses, ce_losses = [], [], []
    try:
        while stopped_by is None:
            for bi in torch.randperm(len(batches), generator=gen).tolist():
                frac, stopped_by = schedule_progress(time.perf_counter() - start, budget_s, steps,
                                                     max_steps)
                if stopped_by is not None:
                    break
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * (1 - frac)
                batch = batches[bi]
                t_out, t_hidden = replay(bi, batch, need_output=loss_kind != "hidden")
                with student_autocast(precision, device_type):
                    s_out = s_module(*batch)
                s_out = s_out.float()
                if wants_hidden:
                    t = t_hidden.detach()
                    hidden_loss = ((store[-1].float() - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean()
                if loss_kind == "hidden":
                    loss = hidden_loss
                else:
                    # one log-softmax of the student serves the KL and the next-token loss
                    s_logp = torch.log_softmax(s_out, dim=-1) if ce_weight > 0 else None
                    loss = _kd_loss(loaded.family, s_out, t_out, s_logp=s_logp)
                    if ce_weight > 0:
                        ce = next_token_loss(s_logp, batch[0])
                        loss = loss + ce_weight * ce
                        ce_losses.append(ce.item())
                    if hidden_weight > 0:
                        loss = loss + hidden_weight * hidden_loss
                    if relation_weight > 0:
                        loss = loss + relation_weight * relation_loss(s_out, t_out)
                if anchor is not None:
                    row_loss = anchor.loss()
                    loss = loss + anchor.weight * row_loss
                    anchor_losses.append(row_loss.item())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                losses.append(loss.item())
                if steps % 25 == 1:
                    say(f"{label}: step {steps}, loss {losses[-1]:.4f}")
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
    k = max(1, min(5, len(losses)))
    rec = {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "precision": precision,
           **({"max_passes": max_passes, "max_steps": max_steps, "stopped_by": stopped_by}
              if max_steps is not None else {}),
           "device": device_name(device), **({"precision_asked": asked} if asked != precision else {}),
           "teacher_forwards": replay.live - live, "teacher_replays": replay.replayed - replayed,
           "loss_step1": losses[0] if losses else math.nan,
           "loss_first": float(np.mean(losses[:k])) if losses else math.nan,
           "loss_last": float(np.mean(losses[-k:])) if losses else math.nan}
    if ce_losses:               # the next-token loss on the calibration text, first and last steps
        rec.update({"ce_weight": ce_weight, "ce_first": float(np.mean(ce_losses[:k])),
                    "ce_last": float(np.mean(ce_losses[-k:]))})
    if anchor_losses:           # the sampled rows' relative error, first and last steps
        rec.update({"anchor_rows_error_first": float(np.mean(anchor_losses[:k])),
                    "anchor_rows_error_last": float(np.mean(anchor_losses[-k:]))})
    return rec


@torch.no_grad()
def _exact_summary(module: nn.Module, E: torch.Tensor, n: torch.Tensor | None, kept: KeptRows) -> dict:
    """With exact rows or a tier: how many, what share of the calibration tokens (counts `n`)
    they cover, and the whole table's relative row error."""
    if kept.ids is None:
        return {}
    out = {"relative_error_with_exact": float(((module.weight - E) ** 2).sum() / (E ** 2).sum())}
    if kept.exact is not None:
        out.update(exact_rows=int(kept.exact.numel()),
                   exact_calibration_coverage=float(n[kept.exact].sum() / n.sum()))
    if kept.tier is not None:
        out.update(tier_rows=int(kept.tier.numel()), tier_rank=kept.rank,
                   tier_calibration_coverage=float(n[kept.tier].sum() / n.sum()))
    return out


def _install(loaded: LoadedModel, module: nn.Module, *, tied: bool) -> None:
    loaded.adapter.set_embeddings(loaded.model, module)
    if tied:
        loaded.adapter.set_lm_head(loaded.model, head_for(module))


def _stages(loaded: LoadedModel, teacher: LoadedModel, module: nn.Module, E: torch.Tensor,
            batches, cfg, label: str) -> dict:
    """Stages 1b and 2 on cfg.device: both models and the batches go there for the stages and
    the student comes back to the CPU after them (also when a stage fails)."""
    device = torch.device(cfg.device)
    if device.type != "cpu":
        say(f"{label}: stages 1b and 2 on {device_name(device)}")
    with on_device([loaded.model, teacher.model], batches, device) as batches:
        groups = trainable_groups(loaded, module, cfg)
        anchor = (RowAnchor(module, E, cfg.row_anchor, cfg.anchor_rows, cfg.seed, device)
                  if cfg.row_anchor > 0 else None)
        replay = TeacherReplay(teacher)       # one for both stages: 1b's batches serve stage 2
        hidden = _train_against_teacher(loaded, teacher, groups, batches, cfg.hidden_minutes,
                                        cfg.seed, "hidden", f"{label} stage 1b", anchor=anchor,
                                        precision=cfg.precision, device=device, replay=replay,
                                        max_passes=cfg.max_passes)
        output = _train_against_teacher(loaded, teacher, groups, batches, cfg.distill_minutes,
                                        cfg.seed + 1, "output", f"{label} stage 2",
                                        hidden_weight=cfg.distill_hidden_weight, anchor=anchor,
                                        precision=cfg.precision, device=device,
                                        relation_weight=cfg.distill_relation_weight, replay=replay,
                                        ce_weight=cfg.distill_ce_weight, max_passes=cfg.max_passes)
    module.requires_grad_(False)          # the new table ships frozen
    extra = sum(p.numel() for g in groups[1:] for p in g["params"])
    return {"stage1_hidden": hidden, "stage2_distill": output, "teacher_replay": replay.record(),
            "train_scope": {"scope": cfg.train_scope, "extra_params_trained": extra}}


def _check_losses_fit(loaded: LoadedModel, config: EmbeddingStages) -> None:
    """The stage-2 loss terms `config` asks for exist for this model's family and task."""
    if config.distill_relation_weight > 0 and loaded.adapter.task != "sts":
        raise BadInputError(f"relations between sentence embeddings are for sentence encoders; "
                            f"this {loaded.family} model's task is {loaded.adapter.task}",
                            field="distill_relation_weight")
    if config.distill_ce_weight > 0 and loaded.family != "llama":
        raise BadInputError(f"the next-token loss is for decoders; this {loaded.family} model "
                            f"predicts no next token", field="distill_ce_weight")


def _embedding_table(loaded: LoadedModel, config: EmbeddingStages) -> torch.Tensor:
    """A detached copy of the plain token-embedding table the method will replace (after the
    checks of `config` against the model that need the model)."""
    _check_losses_fit(loaded, config)
    emb = loaded.adapter.embeddings(loaded.model)
    if emb is None:
        raise BadInputError(f"{loaded.family} models have no token embedding table to encode",
                            field="method")
    if not isinstance(emb, nn.Embedding):
        raise BadInputError("the embedding is already factored; apply see / embed-svd once",
                            field="method")
    return emb.weight.detach().clone()


def _choose_teacher(loaded: LoadedModel, E: torch.Tensor, config: EmbeddingStages,
                    calib: Calibration | None) -> tuple[LoadedModel, str]:
    """The model stages 1b and 2 distil from, and which one it is: a copy of the model as this
    step receives it, or (teacher = original, in a recipe after an earlier step) the model as it
    was before the recipe's first step. Both losses read only the teacher's output and its last
    hidden state, so a teacher with more layers (an earlier layered-prune step) serves as well;
    its vocabulary and width must be this model's."""
    original = calib.original if calib is not None else None
    if config.teacher != "original" or original is None:
        return loaded.clone(), "incoming"
    emb = original.adapter.embeddings(original.model)
    shape = tuple(emb.weight.shape) if isinstance(emb, nn.Embedding) else None
    if shape != tuple(E.shape):
        raise BadInputError(f"the recipe's original model has a {shape} token table, this step's "
                            f"model {tuple(E.shape)}: it cannot be the teacher", field="teacher")
    return original, "original"


def _replace_and_train(loaded: LoadedModel, module: nn.Module, E: torch.Tensor, batches, config,
                       label: str, calib: Calibration | None = None) -> tuple[bool, dict]:
    """Install `module` as the embedding (and the tied head), then run stages 1b and 2 against a
    copy of the model as it was (or the recipe's original model, config.teacher); returns
    (tied, stage records)."""
    tied = loaded.adapter.tied_head(loaded.model)
    teacher, which = _choose_teacher(loaded, E, config, calib)
    _install(loaded, module, tied=tied)
    stages = _stages(loaded, teacher, module, E, batches, config, label)
    return tied, {**stages, "teacher": which}


def adapt_dense(loaded: LoadedModel, config: EmbeddingStages, calib: Calibration) -> dict:
    """The reference for a stage 2 that reads the calibration text's labels (distill_ce_weight):
    the unfactored model trained with stage 2's loss against a copy of itself, every weight at
    scope_lr, for hidden_minutes + distill_minutes (stage 1b has nothing to match in a model
    that is its own teacher, so its minutes go to stage 2, and with max_passes its passes: at
    most 2 x max_passes), on config.device and precision. The
    gain it shows is what the text's domain is worth to any model; returns the stage record."""
    config.validate()
    _check_losses_fit(loaded, config)
    teacher = loaded.clone()
    device = torch.device(config.device)
    with on_device([loaded.model, teacher.model], calib.inputs(loaded), device) as batches:
        groups = [{"params": list(loaded.model.parameters()), "lr": config.scope_lr}]
        rec = _train_against_teacher(loaded, teacher, groups, batches,
                                     config.hidden_minutes + config.distill_minutes,
                                     config.seed + 1, "output", "dense, same stage 2",
                                     hidden_weight=config.distill_hidden_weight,
                                     precision=config.precision, device=device,
                                     relation_weight=config.distill_relation_weight,
                                     ce_weight=config.distill_ce_weight,
                                     max_passes=None if config.max_passes is None else 2 * config.max_passes)
    loaded.model.requires_grad_(False)
    return rec


@register("see", SEEConfig,
          summary="Sememe Entanglement Encoding: rebuild the token embedding (and a tied LM head) "
                  "from shared WordNet-guided unit tables by sums of Kronecker products")
def see(loaded: LoadedModel, config: SEEConfig, calib: Calibration | None) -> dict:
    E = _embedding_table(loaded, config)
    V, d = E.shape
    tokens = loaded.adapter.vocabulary(loaded)
    batches = calib.inputs(loaded) if calib is not None else []
    counts, kept = kept_rows(batches, V, d, config)
    kept_ids = kept.ids                   # the rows the Kronecker sum leaves alone
    # the rows are fitted in one metric (input or head side); the principal basis whitens it
    # (every stage-1a step then runs in it), the raw basis keeps its low-rank form for the Adam phase
    which, M = fit_metric(loaded, batches, config)
    full_root = metric_root(M) if M is not None else None
    root = full_root if config.basis == "principal" else None
    P, X, dims = split_coordinates(E, config, kept, root)
    width = X.shape[1]
    say(f"see: planning units for {V} tokens ({config.basis} basis, d' = "
        f"{' x '.join(map(str, dims))}, ratio {config.ratio:g})")
    plan = plan_units(tokens, loaded.family, X, dims, config, exact=kept_ids, width=d,
                      reserved=0 if P is None else P.numel(), kept_params=kept.params(d))
    lowrank = None
    if M is not None and root is None:
        c, W, share = metric_lowrank(M)
        lowrank = (c, W)
    core = init_entangled(plan, dims, X, config.seed)
    weights = _zero_rows(row_weights(batches, V, config.frequency_weight), V, kept_ids)
    fixed = config.knowledge_role == "fixed"          # the rounds keep WordNet's A units
    rows = fit_rows(core, X, config.reconstruct_steps, config.lr, config.seed, plan.active, weights,
                    metric=lowrank, balance=config.balance_units, reassign=config.reassign_rounds,
                    fixed_a=plan.knowledge if fixed else None, data_from=plan.knowledge_units if fixed else 0)
    if lowrank is not None:
        rows.update({"head_metric": config.head_metric, "metric_rank": W.shape[1],
                     "metric_trace_share": share})
    base = core if P is None else with_basis(core, P)
    if P is not None:
        with torch.no_grad():
            ref = E if root is None else E @ root[0]       # the table in the basis's metric
            rows.update({"basis": "principal", "basis_dim": width,
                         "basis_energy": float((X ** 2).sum() / (ref ** 2).sum()),
                         "coordinates_relative_error": rows["relative_error"],
                         "relative_error": float(((base.weight - E) ** 2).sum() / (E ** 2).sum())})
            if "weighted_relative_error" in rows:        # measured on the coordinates too
                rows["coordinates_weighted_relative_error"] = rows.pop("weighted_relative_error")
            if root is not None:                          # the error in the metric
                err = float((((base.weight - E) @ root[0]) ** 2).sum() / (ref ** 2).sum())
                rows.update({which: getattr(config, which), f"{which}_relative_error": err})
    module = with_kept_rows(base, E, kept, full_root)
    rows.update(_exact_summary(module, E, counts, kept))
    allowed = int(V * d / config.ratio)
    if module.param_count() < UNSPENT_WARNING * allowed:
        say(f"see: only {module.param_count():,} of the {allowed:,} parameters ratio {config.ratio:g} "
            f"allows are used ({V * d / module.param_count():.1f}x): every unit table is capped at "
            "one unit per row it clusters; a lower order, a higher max_rank or exact rows "
            "(exact_share) would spend the rest")
    tied, stages = _replace_and_train(loaded, module, E, batches, config, "see", calib)
    before = V * d
    return {"vocab": V, "d": d, "order": len(dims), "factors": list(dims), "basis": config.basis,
            "basis_dim": width,
            "tied_head": tied, "plan": plan.stats,
            "params_before": before, "params_allowed": allowed, "params_after": module.param_count(),
            "ratio": before / module.param_count(), "stage1_rows": rows, **stages}


def weighted_svd(E: torch.Tensor, k: int, weights: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q), V x k and k x d, minimising sum_v w_v ||p_v Q - e_v||^2: the truncated SVD of
    diag(sqrt w) E with its left factor scaled back by 1 / sqrt w (the plain truncated SVD when
    `weights` is None)."""
    sw = (torch.ones(E.shape[0], dtype=torch.float64) if weights is None
          else weights.double().sqrt()).unsqueeze(-1)
    U, S, Vh = torch.linalg.svd(sw * E.double(), full_matrices=False)
    return (U[:, :k] * S[:k] / sw).float(), Vh[:k].float()


def svd_rank(V: int, d: int, ratio: float, reserved: int = 0, rows: int | None = None) -> int:
    """The rank k whose n x k + k x d factors, plus `reserved` parameters (exact rows, a
    low-rank tier: KeptRows.params), fit the V d / ratio budget (below 1 when they do not);
    n = V, or `rows` + 1 when the factors hold only the rows outside the kept ones
    (LowRankRows over ZeroRows)."""
    return int((V * d / ratio - reserved) / ((V if rows is None else rows + 1) + d))


@dataclass
class EmbedSVDConfig(EmbeddingStages):
    """embed-svd takes exactly the options see shares with it (EmbeddingStages)."""


@register("embed-svd", EmbedSVDConfig,
          summary="baseline: truncated SVD of the embedding (ALBERT-style V x k table + k x d "
                  "projection) at the same ratio, trained with the same stages as see")
def embed_svd(loaded: LoadedModel, config: EmbedSVDConfig, calib: Calibration | None) -> dict:
    E = _embedding_table(loaded, config)
    V, d = E.shape
    batches = calib.inputs(loaded) if calib is not None else []
    counts, kept = kept_rows(batches, V, d, config)
    rest = fitted_rows(V, kept.ids)
    # with kept rows the factors hold only the other rows (no zero row of P per kept token)
    k = svd_rank(V, d, config.ratio, kept.params(d), None if kept.ids is None else int(rest.sum()))
    if k < 1:
        raise BadInputError(f"ratio {config.ratio:g} leaves no rank for a {V} x {d} table"
                            + (" after the exact rows and the tier" if kept.ids is not None else ""),
                            field="ratio")
    weights = row_weights(batches, V, config.frequency_weight)
    _, M = fit_metric(loaded, batches, config)
    # in the metric M = L L^T (head or input): the rank-k optimum of E L, mapped back by L^-1 (exact)
    L, L_inv = metric_root(M) if M is not None else (None, None)
    target = E if L is None else E @ L
    P, Q = weighted_svd(target[rest], k, None if weights is None else weights[rest])
    if L_inv is not None:
        Q = Q @ L_inv
    base = (FactoredEmbedding(P, Q) if kept.ids is None
            else LowRankRows(ZeroRows(V, d), rest.nonzero().squeeze(-1), P, Q))
    module = with_kept_rows(base, E, kept, None if L is None else (L, L_inv))
    with torch.no_grad():
        rel = float(((module.weight - E) ** 2).sum() / (E ** 2).sum())
    rows = {"relative_error": rel, **_exact_summary(module, E, counts, kept),
            **({"head_metric": config.head_metric} if config.head_metric > 0 else {}),
            **({"input_metric": config.input_metric} if config.input_metric > 0 else {})}
    tied, stages = _replace_and_train(loaded, module, E, batches, config, "embed-svd", calib)
    return {"vocab": V, "d": d, "rank": k, "tied_head": tied, "params_before": V * d,
            "params_after": module.param_count(), "ratio": V * d / module.param_count(),
            "stage1_rows": rows, **stages}
