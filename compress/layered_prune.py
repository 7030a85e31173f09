"""`layered-prune`: personalized layered pruning with step buffering (docs/layered_pruning.md).

Layers that barely move the network's output on the user's data ("common" layers) are removed in
steps; after each step a recovery phase (closed-form least squares, or distillation from the
unpruned model within a wall-clock budget) lets the model absorb the cut before the next one is
chosen on the recovered model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from pocketformer.compress.criteria import CRITERIA, CriterionOptions, select_layers
from pocketformer.compress.recovery import RECOVERIES, DistillOptions, distill, lsq_correct
from pocketformer.compress.registry import Calibration, register
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel
from pocketformer.progress import say


@dataclass
class LayeredPruneConfig:
    remove_layers: int
    criterion: str = "personalized"   # personalized | shortgpt | gromov | sleb | last | random
    steps: int = 1                    # step buffering: prune in this many steps
    recovery: str = "none"            # none | lsq | distill, run after every step
    recovery_minutes: float = 5.0     # total distillation budget, split evenly over the steps
    lr: float = 5e-5
    ce_weight: float = 1.0            # next-token loss on the user's text beside KD (decoders)
    sketch_dim: int = 64
    sketch: str = "gaussian"
    sample_fraction: float = 0.25
    per_round: int = 2
    bootstrap: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.remove_layers < 1:
            raise BadInputError("must be at least 1", field="remove_layers")
        if self.criterion not in CRITERIA:
            raise BadInputError(f"expected one of {', '.join(CRITERIA)}, got {self.criterion!r}",
                                field="criterion")
        if self.recovery not in RECOVERIES:
            raise BadInputError(f"expected one of {', '.join(RECOVERIES)}, got {self.recovery!r}",
                                field="recovery")
        if not 1 <= self.steps <= self.remove_layers:
            raise BadInputError(f"must be between 1 and remove_layers ({self.remove_layers})",
                                field="steps")
        if self.recovery_minutes < 0 or self.lr <= 0:
            raise BadInputError("recovery_minutes must be >= 0 and lr > 0", field="recovery_minutes")
        if self.sketch not in ("gaussian", "rademacher") or self.sketch_dim < 1:
            raise BadInputError("sketch must be gaussian or rademacher with sketch_dim >= 1",
                                field="sketch")
        if not 0 < self.sample_fraction <= 1 or self.per_round < 1 or self.bootstrap < 10:
            raise BadInputError("sample_fraction in (0, 1], per_round >= 1, bootstrap >= 10",
                                field="sample_fraction")

    def needs_calibration(self) -> bool:
        return self.criterion not in ("last", "random") or self.recovery != "none"

    def criterion_options(self) -> CriterionOptions:
        return CriterionOptions(seed=self.seed, sketch_dim=self.sketch_dim, sketch=self.sketch,
                                sample_fraction=self.sample_fraction, per_round=self.per_round,
                                bootstrap=self.bootstrap)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _labels(loaded: LoadedModel, calib: Calibration | None):
    """Per-batch labels for classifiers (SLEB's loss on a ViT), else None."""
    if calib is None or loaded.family != "vit":
        return None
    import torch

    labels = torch.as_tensor(calib.data.labels)[: calib.max_samples]
    return [labels[i:i + calib.batch_size] for i in range(0, len(labels), calib.batch_size)]


@register("layered-prune", LayeredPruneConfig,
          summary="personalized layered pruning: remove the layers that matter least for the "
                  "calibration data (or by a published criterion), in steps with recovery between")
def layered_prune(loaded: LoadedModel, config: LayeredPruneConfig, calib: Calibration | None) -> dict:
    adapter = loaded.adapter
    n = len(adapter.layers(loaded.model))
    if config.remove_layers >= n:
        raise BadInputError(f"cannot remove {config.remove_layers} layers: the model has {n} "
                            "(at least one must remain)", field="remove_layers")
    if config.recovery == "lsq" and not adapter.pre_norm:
        raise BadInputError(f"lsq recovery needs a pre-norm family; {loaded.family} normalises after "
                            "the residual add (use recovery = distill)", field="recovery")
    batches = calib.inputs(loaded) if calib is not None else []
    labels = _labels(loaded, calib)
    if config.criterion not in ("last", "random") and not batches:
        raise BadInputError("calibration data is too small to form a single batch", field="calibration")
    teacher = None
    if config.recovery != "none":
        teacher = LoadedModel(adapter, copy.deepcopy(loaded.model), loaded.tokenizer, loaded.source,
                              dict(loaded.extras))
    kept = list(range(n))            # current layer i is original layer kept[i]
    steps = []
    for step, k in enumerate(_split(config.remove_layers, config.steps), 1):
        say(f"layered-prune step {step}/{config.steps}: choose {k} layer(s) by {config.criterion}")
        sel = select_layers(config.criterion, loaded, batches, k, config.criterion_options(), labels)
        removed_original = [kept[i] for i in sel.remove]
        keep_now = [i for i in range(len(kept)) if i not in set(sel.remove)]
        adapter.keep_layers(loaded.model, keep_now)
        kept = [kept[i] for i in keep_now]
        record = {"step": step, "removed": removed_original, "selection": sel.to_dict()}
        if config.recovery == "lsq":
            record["recovery"] = lsq_correct(loaded, teacher, kept, batches)
        elif config.recovery == "distill" and config.recovery_minutes > 0:
            record["recovery"] = distill(
                loaded, teacher, kept, batches,
                DistillOptions(minutes=config.recovery_minutes / config.steps, lr=config.lr,
                               ce_weight=config.ce_weight, seed=config.seed + step), label=f"recovery {step}/{config.steps}")
        steps.append(record)
    removed = sorted(set(range(n)) - set(kept))
    return {"layers_before": n, "layers_after": len(kept), "removed": removed, "kept": kept,
            "criterion": config.criterion, "recovery": config.recovery, "steps": steps,
            "scoring_seconds": round(sum(s["selection"]["seconds"] for s in steps), 3),
            "scoring_layer_evals": sum(s["selection"]["layer_evals"] for s in steps),
            "scoring_head_evals": sum(s["selection"]["head_evals"] for s in steps),
            "recovery_seconds": round(sum(s.get("recovery", {}).get("seconds", 0.0) for s in steps), 1)}
