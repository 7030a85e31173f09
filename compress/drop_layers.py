"""`drop-layers`: remove whole transformer layers, chosen explicitly or by a simple criterion."""
from __future__ import annotations

from dataclasses import dataclass

from pocketformer.compress.registry import Calibration, register
from pocketformer.compress.scoring import block_influence
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel

CRITERIA = ("block-influence", "last")


@dataclass
class DropLayersConfig:
    layers: list[int] | None = None     # explicit 0-based indices to remove
    remove_layers: int | None = None    # or: how many to remove, picked by `criterion`
    criterion: str = "block-influence"  # block-influence (ShortGPT) | last

    def validate(self) -> None:
        if (self.layers is None) == (self.remove_layers is None):
            raise BadInputError("give exactly one of 'layers' (indices) or 'remove_layers' (a count)",
                                field="layers")
        if self.remove_layers is not None and self.remove_layers < 1:
            raise BadInputError("must be at least 1", field="remove_layers")
        if self.criterion not in CRITERIA:
            raise BadInputError(f"expected one of {', '.join(CRITERIA)}, got {self.criterion!r}",
                                field="criterion")

    def needs_calibration(self) -> bool:
        return self.layers is None and self.criterion == "block-influence"



@register("drop-layers", DropLayersConfig,
          summary="remove whole layers: an explicit list, the last N, or the N with the lowest "
                  "Block Influence on the calibration data")
def drop_layers(loaded: LoadedModel, config: DropLayersConfig, calib: Calibration | None) -> dict:
    n = len(loaded.adapter.layers(loaded.model))
    details: dict = {"layers_before": n}
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < n]
        if bad:
            raise BadInputError(f"layer indices {bad} out of range: the model has {n} layers (0..{n - 1})",
                                field="layers")
        if len(set(config.layers)) != len(config.layers):
            raise BadInputError("duplicate layer indices", field="layers")
        remove = sorted(config.layers)
    else:
        k = config.remove_layers
        if k >= n:
            raise BadInputError(f"cannot remove {k} layers: the model has {n} (at least one must remain)",
                                field="remove_layers")
        if config.criterion == "last":
            remove = list(range(n - k, n))
        else:
            scores = block_influence(loaded, calib.inputs(loaded))
            details["scores"] = [round(s, 6) for s in scores]
            remove = sorted(sorted(range(n), key=lambda i: scores[i])[:k])
    if len(remove) >= n:
        raise BadInputError(f"cannot remove all {n} layers", field="layers")
    keep = [i for i in range(n) if i not in set(remove)]
    loaded.adapter.keep_layers(loaded.model, keep)
    details.update(removed=remove, kept=keep, layers_after=len(keep))
    return details
