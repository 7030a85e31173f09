"""Width pruning of kept layers: FFN channels and whole KV-head groups, allocated across layers
by how much each layer matters for the user's data (its personalized score), so that common
layers are shrunk harder. Widths are rounded to kernel-friendly multiples."""
from __future__ import annotations

import math

import numpy as np
import torch

from pocketformer.models import LoadedModel
from pocketformer.progress import progress


@torch.inference_mode()
def channel_energy(loaded: LoadedModel, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN channel energy E_t[u_j^2] ||W_out[:, j]||^2 (the channel's expected squared
    contribution to the layer output) and KV-group energy E_t ||W_o[:, group] h_group||^2."""
    adapter = loaded.adapter
    model = loaded.model
    layers = adapter.layers(model)
    module = adapter.export_module(loaded)
    ffn_sq = [None] * len(layers)
    grp = [None] * len(layers)
    count = [0]
    hooks = []
    for i, layer in enumerate(layers):
        ffn = adapter.ffn(layer)
        attn = adapter.attention(layer, model.config)

        def ffn_hook(mod, args, i=i):
            u = args[0].reshape(-1, args[0].shape[-1]).float()
            s = (u ** 2).sum(0)
            ffn_sq[i] = s if ffn_sq[i] is None else ffn_sq[i] + s

        def o_hook(mod, args, i=i, attn=attn):
            h = args[0].reshape(-1, args[0].shape[-1]).float()
            g, hd = attn.group_size, attn.head_dim
            width = g * hd
            e = torch.stack([((h[:, k * width:(k + 1) * width] @ mod.weight[:, k * width:(k + 1) * width].T) ** 2)
                             .sum() for k in range(attn.num_kv_heads)])
            grp[i] = e if grp[i] is None else grp[i] + e

        hooks.append(ffn.output.register_forward_pre_hook(ffn_hook))
        hooks.append(attn.o_proj.register_forward_pre_hook(o_hook))
    try:
        for batch in progress(batches, "width scores"):
            module(*batch)
            count[0] += 1
    finally:
        for h in hooks:
            h.remove()
    ffn_scores = []
    for i, layer in enumerate(layers):
        w = adapter.ffn(layer).output.weight.float()
        ffn_scores.append(ffn_sq[i] * (w ** 2).sum(0))
    return ffn_scores, grp


def _allocate(shares: list[torch.Tensor], weights: np.ndarray, keep_total: int, multiple: int,
              minimum: int) -> list[int]:
    """Split a budget of `keep_total` units over layers: each layer first keeps its `minimum`,
    the rest goes to the units with the largest weight_l * share_lj across layers; each count is
    then rounded to the nearest `multiple` (never below `minimum` nor above the layer's width)."""
    counts = [min(minimum, len(s)) for s in shares]
    flat = []
    for l, s in enumerate(shares):
        share = torch.sort(s / s.sum().clamp(min=1e-30), descending=True).values.numpy()
        flat += [(weights[l] * float(v), l) for v in share[counts[l]:]]
    flat.sort(key=lambda t: -t[0])
    for _, l in flat[:max(0, keep_total - sum(counts))]:
        counts[l] += 1
    out = []
    for l, c in enumerate(counts):
        if multiple > 1:
            c = int(round(c / multiple)) * multiple
        out.append(min(len(shares[l]), max(minimum, c)))
    return out


def shrink(loaded: LoadedModel, batches, *, ffn_keep_total: int, kv_keep_total: int,
           layer_weights: list[float] | None, multiple: int) -> dict:
    """Keep about `ffn_keep_total` FFN channels and `kv_keep_total` KV groups over all layers
    (whole query groups go with their KV head; head_dim is untouched)."""
    adapter = loaded.adapter
    layers = adapter.layers(loaded.model)
    n = len(layers)
    # Square root: a layer whose removal barely moves the output still keeps a useful width.
    weights = np.ones(n) if layer_weights is None else np.sqrt(np.clip(layer_weights, 0, None))
    weights = weights / weights.mean() if weights.mean() > 0 else np.ones(n)
    ffn_scores, grp_scores = channel_energy(loaded, batches)
    result: dict = {"layer_weights": weights.tolist()}
    if ffn_keep_total < sum(len(s) for s in ffn_scores):
        counts = _allocate(ffn_scores, weights, ffn_keep_total, multiple, multiple)
        for layer, scores, c in zip(layers, ffn_scores, counts):
            if c < len(scores):
                keep = torch.argsort(scores, descending=True)[:c].sort().values
                adapter.keep_ffn_channels(layer, keep.tolist())
        result["ffn_widths"] = counts
    if kv_keep_total < sum(len(s) for s in grp_scores):
        counts = _allocate(grp_scores, weights, kv_keep_total, 1, 1)
        for layer, scores, c in zip(layers, grp_scores, counts):
            if c < len(scores):
                keep = torch.argsort(scores, descending=True)[:c].sort().values
                adapter.keep_kv_heads(layer, loaded.model.config, keep.tolist())
        result["kv_heads"] = counts
    return result
