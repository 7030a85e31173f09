"""Which whole layers to remove: our personalized criterion and the published baselines.

Every criterion answers the same question, `select(...) -> Selection`, on the same calibration
batches, and is timed and costed the same way, so `pocketformer compress --criterion X` and the
benchmark compare like with like. The formulation of `personalized` is in
docs/layered_pruning.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from pocketformer.compress.probe import LayerProbe, Trace
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel
from pocketformer.progress import progress


@dataclass
class CriterionOptions:
    seed: int = 0
    sketch_dim: int = 64            # m, rows of the random projection (personalized)
    sketch: str = "gaussian"        # gaussian | rademacher
    sample_fraction: float = 0.25   # share of calibration batches drawn per scoring round
    per_round: int = 2              # layers removed per re-scoring round (personalized)
    bootstrap: int = 1000           # resamples for score intervals and selection stability


@dataclass
class Selection:
    criterion: str
    remove: list[int]                     # indices into the layer stack the criterion was given
    order: list[int]                      # the same, in the order they were chosen
    scores: list[float] | None = None     # first-round score per layer (lower = safer to remove)
    seconds: float = 0.0
    layer_evals: int = 0                  # layer forward passes x tokens
    head_evals: int = 0                   # output-head (LM head / classifier) rows computed
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _bottom(scores: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[int]:
    order = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in exclude]
    return order[:k]


def _layer_outputs(trace: Trace) -> list[torch.Tensor]:
    return trace.inputs[1:] + [trace.final]


def _token_mask(loaded: LoadedModel, batch) -> torch.Tensor | None:
    names = loaded.adapter.input_names
    return batch[names.index("attention_mask")].bool() if "attention_mask" in names else None


# ---- published baselines ------------------------------------------------------------------------

def shortgpt(loaded, batches, k, opts) -> Selection:
    """ShortGPT (Men et al., 2024): Block Influence BI_i = 1 - E_t cos(x_i,t, x_i+1,t) over every
    calibration token; remove the k layers with the lowest BI, in one shot."""
    probe = LayerProbe(loaded)
    n = len(probe.layers)
    sums, count = np.zeros(n), 0
    for batch in progress(batches, "shortgpt"):
        trace = probe.trace(batch, range(n))
        mask = _token_mask(loaded, batch)
        for i, (x, y) in enumerate(zip(trace.inputs, _layer_outputs(trace))):
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos)[mask].sum() if mask is not None else (1 - cos).sum())
        count += int(mask.sum()) if mask is not None else trace.tokens
    scores = sums / max(count, 1)
    order = _bottom(scores, k)
    return Selection("shortgpt", sorted(order), order, scores.tolist(), layer_evals=probe.layer_evals)


def gromov(loaded, batches, k, opts) -> Selection:
    """Gromov et al. (2024), "The Unreasonable Ineffectiveness of the Deeper Layers": remove the
    contiguous block of k layers starting at l* = argmin_l mean_x d(x^(l), x^(l+k)), with the
    angular distance d = arccos(cos)/pi measured at each sequence's last token (for encoders and
    ViT, at every valid position, since there is no privileged last token)."""
    probe = LayerProbe(loaded)
    n = len(probe.layers)
    if k >= n:
        raise BadInputError(f"cannot remove {k} of {n} layers")
    sums, count = np.zeros(n - k + 1), 0
    causal = loaded.family == "llama"
    for batch in progress(batches, "gromov"):
        trace = probe.trace(batch, range(n))
        states = trace.inputs + [trace.final]          # states[l] = input of layer l
        mask = _token_mask(loaded, batch)
        for start in range(n - k + 1):
            a, b = states[start].float(), states[start + k].float()
            if causal:
                a, b = a[:, -1], b[:, -1]
            ang = torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi
            sums[start] += float(ang[mask].sum() if (mask is not None and not causal) else ang.sum())
        count += (int(mask.sum()) if (mask is not None and not causal) else
                  (batch[0].shape[0] if causal else trace.tokens))
    dist = sums / max(count, 1)
    start = int(np.argmin(dist))
    remove = list(range(start, start + k))
    return Selection("gromov", remove, remove, None, layer_evals=probe.layer_evals,
                     details={"block_start": start, "angular_distance": dist.tolist()})


def _task_loss(probe: LayerProbe, trace: Trace, hidden: torch.Tensor, reference: torch.Tensor | None,
               labels: torch.Tensor | None) -> tuple[float, int]:
    """Summed calibration loss of the network whose last layer output is `hidden`: next-token NLL
    for decoders, cross-entropy on the labels for classifiers, 1 - cos to the unpruned sentence
    embedding for encoders (which have no labels in calibration data)."""
    loaded = probe.loaded
    feats = probe.features(trace, hidden)
    head = loaded.adapter.output_head(loaded.model)
    if loaded.family == "llama":
        ids = trace.batch[0]
        logits = head(feats).view(ids.shape[0], ids.shape[1], -1)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        return float(nll), int(feats.shape[0])
    if head is not None and labels is not None:
        return float(torch.nn.functional.cross_entropy(head(feats), labels, reduction="sum")), int(feats.shape[0])
    cos = torch.nn.functional.cosine_similarity(feats, reference, dim=-1)
    return float((1 - cos).sum()), 0


def sleb(loaded, batches, k, opts, labels=None) -> Selection:
    """SLEB (Song et al., 2024): greedy; at each of k iterations remove the layer whose removal
    gives the lowest loss (perplexity for LMs) on the calibration data, re-evaluating every
    remaining layer after each removal. Prefix states are reused (the same probe engine as ours),
    which gives SLEB the same implementation advantage; its cost is the loss through the full
    output head for every candidate."""
    probe = LayerProbe(loaded)
    n = len(probe.layers)
    active = list(range(n))
    order: list[int] = []
    first = None
    head = loaded.adapter.output_head(loaded.model)
    head_rows = head.out_features if head is not None else 0
    head_evals = 0
    references = None
    if loaded.family == "bert":
        references = [probe.features(t, t.final) for t in (probe.trace(b, active) for b in batches)]
    for step in range(k):
        scores = np.zeros(len(active))
        for bi, batch in enumerate(progress(batches, f"sleb {step + 1}/{k}")):
            trace = probe.trace(batch, active)
            lab = labels[bi] if labels is not None else None
            ref = references[bi] if references is not None else None
            for pos in range(len(active)):
                loss, rows = _task_loss(probe, trace, probe.without(trace, pos), ref, lab)
                scores[pos] += loss
                head_evals += rows * head_rows
        if first is None:
            first = scores.tolist()
        pos = int(np.argmin(scores))
        order.append(active.pop(pos))
    return Selection("sleb", sorted(order), order, first, layer_evals=probe.layer_evals,
                     head_evals=head_evals)


def last(loaded, batches, k, opts) -> Selection:
    """Drop the last k layers (no data)."""
    n = len(loaded.adapter.layers(loaded.model))
    remove = list(range(n - k, n))
    return Selection("last", remove, remove)


def random_layers(loaded, batches, k, opts) -> Selection:
    """k layers drawn uniformly at random (seeded): the floor any criterion must beat."""
    n = len(loaded.adapter.layers(loaded.model))
    rng = np.random.default_rng(opts.seed)
    order = [int(i) for i in rng.choice(n, size=k, replace=False)]
    return Selection("random", sorted(order), order, details={"seed": opts.seed})


# ---- ours ---------------------------------------------------------------------------------------

def fisher_metric(probe: LayerProbe, traces: list[Trace]) -> torch.Tensor | None:
    """G = E_t[W^T (diag p_t - p_t p_t^T) W], the output head's Fisher metric averaged over the
    calibration positions: (dz)^T G (dz) ~ 2 KL(p || p') for a small change dz of the features.
    None (identity) when the output is an embedding rather than a distribution."""
    head = probe.adapter.output_head(probe.loaded.model)
    if head is None:
        return None
    W = head.weight.detach().double()
    d = W.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64)
    psum = torch.zeros(W.shape[0], dtype=torch.float64)
    rows = 0
    with torch.inference_mode():
        for trace in traces:
            feats = probe.features(trace, trace.final).double()
            p = torch.softmax(head(feats.float()).double(), dim=-1)
            psum += p.sum(0)
            q = p @ W
            G -= q.T @ q
            rows += feats.shape[0]
        G += (W.T * psum) @ W
    return G / max(rows, 1)


def measurement_matrix(G: torch.Tensor | None, d: int, opts: CriterionOptions
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Phi, S): Phi a random m x d projection scaled by 1/sqrt(m), and S = Phi U with U^T U = G,
    so E||S dz||^2 = dz^T G dz (Johnson-Lindenstrauss); S = Phi when G is None."""
    gen = torch.Generator().manual_seed(opts.seed)
    m = opts.sketch_dim
    if opts.sketch == "rademacher":
        phi = (torch.randint(0, 2, (m, d), generator=gen) * 2 - 1).double()
    else:
        phi = torch.randn(m, d, generator=gen, dtype=torch.float64)
    phi /= math.sqrt(m)
    if G is None:
        return phi.float(), phi.float()
    evals, evecs = torch.linalg.eigh(G)
    U = (evecs * evals.clamp(min=0).sqrt()).T
    return phi.float(), (phi @ U).float()


def _bootstrap(per_sample: np.ndarray, k: int, reps: int, seed: int) -> dict:
    """per_sample: [samples, layers]. Resample samples with replacement."""
    rng = np.random.default_rng(seed)
    n = per_sample.shape[0]
    means = np.empty((reps, per_sample.shape[1]))
    chosen = np.zeros(per_sample.shape[1])
    for r in range(reps):
        m = per_sample[rng.integers(0, n, n)].mean(0)
        means[r] = m
        chosen[np.argsort(m, kind="stable")[:k]] += 1
    return {"low": np.percentile(means, 5, axis=0).tolist(),
            "high": np.percentile(means, 95, axis=0).tolist(),
            "selected_share": (chosen / reps).tolist()}


def _stable_after(per_sample: np.ndarray, k: int) -> int:
    """Fewest samples after which the k lowest-scoring layers no longer change."""
    final = set(np.argsort(per_sample.mean(0), kind="stable")[:k].tolist())
    stable = per_sample.shape[0]
    for n in range(per_sample.shape[0], 0, -1):
        if set(np.argsort(per_sample[:n].mean(0), kind="stable")[:k].tolist()) != final:
            break
        stable = n
    return stable


def _measure_round(probe: LayerProbe, traces: list[Trace], S: torch.Tensor, phi: torch.Tensor
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and per active layer: the sketched output change when the layer is skipped
    (global view) and 1 - cos of the layer's sketched input and output (local view)."""
    per_sample, local = [], []
    for trace in progress(traces, "personalized"):
        n = len(trace.active)
        bsz = trace.batch[0].shape[0]
        y0 = probe.features(trace, trace.final) @ S.T
        dist = np.zeros((bsz, n))
        loc = np.zeros((bsz, n))
        outs = _layer_outputs(trace)
        mask = _token_mask(probe.loaded, trace.batch)
        for pos in range(n):
            y = probe.features(trace, probe.without(trace, pos)) @ S.T
            dist[:, pos] = ((y - y0) ** 2).sum(-1).view(bsz, -1).mean(1).numpy()
            c = torch.nn.functional.cosine_similarity(trace.inputs[pos] @ phi.T, outs[pos] @ phi.T, dim=-1)
            c = c.masked_fill(~mask, 1.0) if mask is not None else c
            loc[:, pos] = (1 - c).mean(-1).numpy()
        per_sample.append(dist)
        local.append(loc)
    return np.concatenate(per_sample), np.concatenate(local)


def _sketch_for(probe: LayerProbe, traces: list[Trace], opts: CriterionOptions):
    G = fisher_metric(probe, traces)
    return measurement_matrix(G, traces[0].final.shape[-1], opts)


def layer_sensitivity(loaded: LoadedModel, batches, opts: CriterionOptions) -> list[float]:
    """One personalized round on the current stack without removing anything: how much the
    output on the user's data moves when each layer is skipped (used to allocate widths)."""
    probe = LayerProbe(loaded)
    rng = np.random.default_rng(opts.seed)
    nb = len(batches)
    picked = sorted(rng.choice(nb, size=max(1, min(nb, int(round(opts.sample_fraction * nb)))),
                               replace=False).tolist())
    with torch.inference_mode():
        traces = [probe.trace(batches[i], range(len(probe.layers))) for i in picked]
        phi, S = _sketch_for(probe, traces, opts)
        per_sample, _ = _measure_round(probe, traces, S, phi)
    return per_sample.mean(0).tolist()


def personalized(loaded, batches, k, opts) -> Selection:
    """Personalized layered pruning (docs/layered_pruning.md): in rounds, draw a random subset of
    the user's calibration batches; for each remaining layer measure, through a random projection
    of the Fisher-weighted output features, how much the network's output on this data moves when
    the layer is skipped; remove the `per_round` layers that move it least (the "common" layers),
    then re-measure the smaller network."""
    probe = LayerProbe(loaded)
    n = len(probe.layers)
    active = list(range(n))
    order: list[int] = []
    rng = np.random.default_rng(opts.seed)
    rounds: list[dict] = []
    phi = S = None
    nb = len(batches)
    draw = max(1, min(nb, int(round(opts.sample_fraction * nb))))
    while len(order) < k:
        picked = sorted(rng.choice(nb, size=draw, replace=False).tolist())
        traces = [probe.trace(batches[i], active) for i in picked]
        if S is None:
            phi, S = _sketch_for(probe, traces, opts)
        per_sample, local = _measure_round(probe, traces, S, phi)
        scores = per_sample.mean(0)
        take = min(opts.per_round, k - len(order))
        boot = _bootstrap(per_sample, take, opts.bootstrap, opts.seed + len(rounds))
        chosen = [active[p] for p in _bottom(scores, take)]
        rounds.append({
            "active": list(active), "samples": int(per_sample.shape[0]), "batches": picked,
            "scores": scores.tolist(), "interval_low": boot["low"], "interval_high": boot["high"],
            "selected_share": boot["selected_share"], "local_scores": local.mean(0).tolist(),
            "stable_after_samples": _stable_after(per_sample, take), "removed": chosen,
        })
        order += chosen
        active = [i for i in active if i not in chosen]
    first = rounds[0]
    threshold = max(first["scores"][first["active"].index(i)] for i in first["removed"])
    classes = []
    for i in range(n):
        if i in order:
            classes.append("common")
        else:
            p = first["active"].index(i)
            classes.append("personalized" if first["interval_low"][p] > threshold else "uncertain")
    metric = "fisher" if probe.adapter.output_head(loaded.model) is not None else "euclidean"
    return Selection("personalized", sorted(order), order, first["scores"],
                     layer_evals=probe.layer_evals,
                     details={"sketch_dim": opts.sketch_dim, "sketch": opts.sketch, "metric": metric,
                              "rounds": rounds, "classes": classes})


CRITERIA: dict[str, Callable] = {
    "personalized": personalized,
    "shortgpt": shortgpt,
    "gromov": gromov,
    "sleb": sleb,
    "last": last,
    "random": random_layers,
}


def select_layers(criterion: str, loaded: LoadedModel, batches, k: int,
                  opts: CriterionOptions | None = None, labels=None) -> Selection:
    if criterion not in CRITERIA:
        raise BadInputError(f"unknown criterion {criterion!r}; expected one of {', '.join(CRITERIA)}",
                            field="criterion")
    n = len(loaded.adapter.layers(loaded.model))
    if not 1 <= k < n:
        raise BadInputError(f"cannot remove {k} layers: the model has {n} (at least one must remain)",
                            field="remove_layers")
    opts = opts or CriterionOptions()
    start = time.perf_counter()
    fn = CRITERIA[criterion]
    with torch.inference_mode():
        sel = fn(loaded, batches, k, opts, labels) if criterion == "sleb" else fn(loaded, batches, k, opts)
    sel.seconds = round(time.perf_counter() - start, 3)
    return sel
