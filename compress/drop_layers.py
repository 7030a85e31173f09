"""`drop-layers`: remove whole transformer layers, chosen explicitly or by one of the layer
criteria (compress/criteria.py), in one shot and without recovery."""
from __future__ import annotations

from dataclasses import dataclass

from pocketformer.compress.criteria import CRITERIA, CriterionOptions, select_layers
from pocketformer.compress.registry import Calibration, register
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel


@dataclass
class DropLayersConfig:
    layers: list[int] | None = None     # explicit 0-based indices to remove
    remove_layers: int | None = None    # or: how many to remove, picked by `criterion`
    criterion: str = "shortgpt"         # any layer criterion; see `pocketformer models`

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
        return self.layers is None and self.criterion not in ("last", "random")


@register("drop-layers", DropLayersConfig,
          summary="remove whole layers: an explicit list, or N chosen by a layer criterion "
                  "(shortgpt, gromov, sleb, personalized, last, random), no recovery")
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
        batches = calib.inputs(loaded) if calib is not None else []
        sel = select_layers(config.criterion, loaded, batches, config.remove_layers, CriterionOptions())
        remove = sel.remove
        if sel.scores is not None:
            details["scores"] = [round(s, 6) for s in sel.scores]
        details["scoring_seconds"] = sel.seconds
    if len(remove) >= n:
        raise BadInputError(f"cannot remove all {n} layers", field="layers")
    keep = [i for i in range(n) if i not in set(remove)]
    loaded.adapter.keep_layers(loaded.model, keep)
    details.update(removed=remove, kept=keep, layers_after=len(keep))
    return details
