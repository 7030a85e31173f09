"""Per-layer measurements on calibration data, gathered with forward hooks on the layer stack."""
from __future__ import annotations

import torch

from pocketformer.models import LoadedModel
from pocketformer.progress import progress


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _token_mask(loaded: LoadedModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    names = loaded.adapter.input_names
    if "attention_mask" in names:
        return batch[names.index("attention_mask")].bool()
    return None


@torch.inference_mode()
def block_influence(loaded: LoadedModel, batches) -> list[float]:
    """ShortGPT's Block Influence: 1 - cos(x_in, x_out) per layer, averaged over tokens.

    Low influence means the layer barely changes its input, so removing it costs least.
    """
    layers = loaded.adapter.layers(loaded.model)
    module = loaded.adapter.export_module(loaded)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    state: dict = {}

    def make_hook(i):
        def hook(mod, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = _first_tensor(output)
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            mask = state["mask"]
            sums[i] += (1 - cos)[mask].sum().double() if mask is not None else (1 - cos).sum().double()
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for batch in progress(batches, "block influence"):
            state["mask"] = _token_mask(loaded, batch)
            count += int(state["mask"].sum()) if state["mask"] is not None else batch[0].numel()
            module(*batch)
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()
