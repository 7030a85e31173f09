"""`layered-prune`: personalized layered pruning with step buffering (docs/layered_pruning.md).

Layers that barely move the network's output on the user's data ("common" layers) are removed in
steps; after each step a recovery phase (closed-form least squares, or distillation from the
unpruned model within a wall-clock budget) lets the model absorb the cut before the next one is
chosen on the recovered model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pocketformer.compress import width
from pocketformer.compress.criteria import CRITERIA, CriterionOptions, layer_sensitivity, select_layers
from pocketformer.compress.recovery import (RECOVERIES, DistillOptions, LowRank,
                                            TeacherTargets, check_device, check_precision,
                                            device_name, distill, lsq_correct, memory_room,
                                            on_device)
from pocketformer.compress.registry import Calibration, register
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel, count_params
from pocketformer.progress import say


@dataclass
class LayeredPruneConfig:
    remove_layers: int = 0            # whole layers to remove (depth)
    criterion: str = "personalized"   # personalized | shortgpt | gromov | sleb | last | random
    ffn_keep: float = 1.0             # width: share of FFN channels kept in the kept layers
    kv_keep: float = 1.0              # width: share of KV-head groups kept (query groups follow)
    params_fraction: float | None = None  # or: share of non-embedding params to remove in all;
                                          # sets ffn_keep to reach it after the depth cut
    width_multiple: int = 64          # kept FFN widths are multiples of this (kernel-friendly)
    steps: int = 1                    # step buffering: prune in this many steps
    recovery: str = "none"            # none | lsq | distill, run after every step
    recovery_minutes: float = 5.0     # total distillation budget, split evenly over the steps
    final_recovery_share: float | None = None  # or: this share of it after the last step, the
                                      # rest split evenly between the earlier steps
    lr: float = 5e-5
    recovery_rank: int = 0            # distill: > 0 trains a rank-r term beside each frozen linear
                                      # instead of the weights (exact 4-bit export, export/grid.py)
    recovery_precision: str = "fp32"  # distill: fp32 | bf16 | auto (CPU autocast of the
                                      # student's forward/backward: ~1.7x the steps per budget
                                      # on CPUs with AVX512-BF16, ~31x fewer on AVX2-only ones;
                                      # auto = bf16 only where native; fp32 weights and losses)
    ce_weight: float = 1.0            # next-token loss on the user's text beside KD (decoders)
    recovery_holdout: float = 0.0     # distill: this share of the calibration batches is held
                                      # out; each recovery keeps its parameters at the lowest
                                      # loss on them (early stopping)
    recovery_max_passes: float | None = None  # distill: at most this many passes over the
                                      # calibration batches in all, split over the steps as the
                                      # minutes are; whichever of the two ends first ends a
                                      # recovery (a fast machine would otherwise overfit the
                                      # user's text: docs/layered_pruning.md, "Passes")
    device: str = "cpu"               # distill: the teacher's targets and every recovery step
                                      # run on this torch device (cpu | cuda | cuda:N); the
                                      # criteria, width cuts and the saved model stay on the CPU
    teacher_top_k: int = 0            # decoders: keep the teacher's top-k tokens per position
                                      # (0: the whole distribution) so more text fits in memory
    sketch_dim: int = 64
    sketch: str = "gaussian"
    sample_fraction: float = 0.25
    per_round: int = 2
    bootstrap: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.remove_layers < 0:
            raise BadInputError("must be >= 0", field="remove_layers")
        if not (0 < self.ffn_keep <= 1 and 0 < self.kv_keep <= 1):
            raise BadInputError("ffn_keep and kv_keep must be in (0, 1]", field="ffn_keep")
        if self.params_fraction is not None and not 0 < self.params_fraction < 1:
            raise BadInputError("must be in (0, 1)", field="params_fraction")
        if self.params_fraction is not None and self.ffn_keep < 1:
            raise BadInputError("give ffn_keep or params_fraction, not both", field="params_fraction")
        if (self.remove_layers == 0 and self.ffn_keep == 1 and self.kv_keep == 1
                and self.params_fraction is None):
            raise BadInputError("nothing to prune: set remove_layers, ffn_keep, kv_keep or "
                                "params_fraction", field="remove_layers")
        if self.width_multiple < 1:
            raise BadInputError("must be >= 1", field="width_multiple")
        if self.criterion not in CRITERIA:
            raise BadInputError(f"expected one of {', '.join(CRITERIA)}, got {self.criterion!r}",
                                field="criterion")
        if self.recovery not in RECOVERIES:
            raise BadInputError(f"expected one of {', '.join(RECOVERIES)}, got {self.recovery!r}",
                                field="recovery")
        if self.steps < 1 or (self.remove_layers and self.steps > self.remove_layers):
            raise BadInputError(f"must be between 1 and remove_layers ({self.remove_layers})",
                                field="steps")
        if self.recovery_rank < 0:
            raise BadInputError("must be >= 0 (0: train the weights themselves)", field="recovery_rank")
        if self.recovery_rank and self.recovery != "distill":
            raise BadInputError(f"a low-rank recovery is a distillation; recovery is {self.recovery!r}",
                                field="recovery_rank")
        if self.recovery_rank and self.prunes_width():
            raise BadInputError("a low-rank recovery keeps each linear's weights and adds a rank-r "
                                "term; width pruning slices the weights between steps (use "
                                "recovery_rank = 0 with ffn_keep, kv_keep or params_fraction)",
                                field="recovery_rank")
        check_precision(self.recovery_precision, "recovery_precision")
        check_device(self.device, "device")
        if self.final_recovery_share is not None and not 0 < self.final_recovery_share < 1:
            raise BadInputError("must be in (0, 1): the share of the recovery budget spent after "
                                "the last step", field="final_recovery_share")
        if not 0 <= self.recovery_holdout < 0.5:
            raise BadInputError("must be in [0, 0.5): the share of the calibration batches held "
                                "out of the recovery", field="recovery_holdout")
        if self.recovery_max_passes is not None and not self.recovery_max_passes > 0:
            raise BadInputError("must be > 0: passes over the calibration batches in all the "
                                "recoveries", field="recovery_max_passes")
        if self.teacher_top_k < 0:
            raise BadInputError("must be >= 0 (0: the whole distribution)", field="teacher_top_k")
        if self.recovery_minutes < 0 or self.lr <= 0:
            raise BadInputError("recovery_minutes must be >= 0 and lr > 0", field="recovery_minutes")
        if self.sketch not in ("gaussian", "rademacher") or self.sketch_dim < 1:
            raise BadInputError("sketch must be gaussian or rademacher with sketch_dim >= 1",
                                field="sketch")
        if not 0 < self.sample_fraction <= 1 or self.per_round < 1 or self.bootstrap < 10:
            raise BadInputError("sample_fraction in (0, 1], per_round >= 1, bootstrap >= 10",
                                field="sample_fraction")

    def prunes_width(self) -> bool:
        return self.ffn_keep < 1 or self.kv_keep < 1 or self.params_fraction is not None

    def needs_calibration(self) -> bool:
        return (self.criterion not in ("last", "random") or self.recovery != "none"
                or self.prunes_width())

    def criterion_options(self) -> CriterionOptions:
        return CriterionOptions(seed=self.seed, sketch_dim=self.sketch_dim, sketch=self.sketch,
                                sample_fraction=self.sample_fraction, per_round=self.per_round,
                                bootstrap=self.bootstrap)


def _recovery_budgets(total: float, steps: int, final_share: float | None) -> list[float]:
    """Each step's part of a distillation budget (minutes, or passes over the data): even, or
    `final_share` of it after the last step and the rest split evenly between the others (one
    step takes it all)."""
    if steps == 1 or final_share is None:
        return [total / steps] * steps
    return [total * (1 - final_share) / (steps - 1)] * (steps - 1) + [total * final_share]


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _ffn_keep_for_target(loaded: LoadedModel, config: LayeredPruneConfig) -> float:
    """The FFN keep share that, after removing `remove_layers` whole layers, removes
    `params_fraction` of the non-embedding parameters (KV groups as `kv_keep` says)."""
    adapter = loaded.adapter
    info = adapter.describe(loaded.model)
    layers = adapter.layers(loaded.model)
    per_layer = count_params(layers[0])
    n = len(layers)
    kept = n - config.remove_layers
    target = config.params_fraction * info["non_embedding_params"]
    ffn = adapter.ffn(layers[0])
    per_channel = sum(l.in_features + (1 if l.bias is not None else 0) for l in ffn.inputs) \
        + ffn.output.out_features
    attn = adapter.attention(layers[0], loaded.model.config)
    per_group = count_params(attn.q_proj) + count_params(attn.k_proj) + count_params(attn.v_proj)
    per_group = (per_group + attn.o_proj.weight.numel()) / attn.num_kv_heads
    kv_removed = kept * attn.num_kv_heads * (1 - config.kv_keep) * per_group
    width_needed = target - config.remove_layers * per_layer - kv_removed
    if width_needed <= 0:
        return 1.0
    channels = kept * ffn.width
    keep = 1 - width_needed / (channels * per_channel)
    if keep <= 0.05:
        raise BadInputError(f"params_fraction {config.params_fraction} cannot be met by removing "
                            f"{config.remove_layers} layers and FFN channels; remove more layers",
                            field="params_fraction")
    return keep


def _labels(loaded: LoadedModel, calib: Calibration | None):
    """Per-batch labels for classifiers (SLEB's loss on a ViT), else None."""
    if calib is None or loaded.family != "vit":
        return None
    return loaded.adapter.calibration_labels(calib.data, max_samples=calib.max_samples,
                                             batch_size=calib.batch_size, seed=calib.seed)


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
        teacher = loaded.clone()
    ffn_keep = _ffn_keep_for_target(loaded, config) if config.params_fraction else config.ffn_keep
    ffn_width0 = adapter.ffn(adapter.layers(loaded.model)[0]).width
    kv0 = adapter.attention(adapter.layers(loaded.model)[0], loaded.model.config).num_kv_heads
    distilling = config.recovery == "distill" and config.recovery_minutes > 0
    device = torch.device(config.device)
    if distilling and device.type != "cpu":
        say(f"layered-prune: recovery on {device_name(device)}")
    targets = _teacher_targets(teacher, batches, config.teacher_top_k, device) if distilling else None
    # computing the targets is part of the recovery budget
    spent = targets.seconds / 60 if targets is not None else 0.0
    minutes = _recovery_budgets(max(0.0, config.recovery_minutes - spent), config.steps,
                                config.final_recovery_share)
    passes = (None if config.recovery_max_passes is None else
              _recovery_budgets(config.recovery_max_passes, config.steps, config.final_recovery_share))
    kept = list(range(n))            # current layer i is original layer kept[i]
    lowrank = LowRank(config.recovery_rank, config.seed) if distilling and config.recovery_rank else None
    steps = []
    for step, k in enumerate(_split(config.remove_layers, config.steps), 1):
        record: dict = {"step": step, "removed": []}
        if k:
            say(f"layered-prune step {step}/{config.steps}: choose {k} layer(s) by {config.criterion}")
            sel = select_layers(config.criterion, loaded, batches, k, config.criterion_options(), labels)
            keep_now = [i for i in range(len(kept)) if i not in set(sel.remove)]
            adapter.keep_layers(loaded.model, keep_now)
            record.update(removed=[kept[i] for i in sel.remove], selection=sel.to_dict())
            kept = [kept[i] for i in keep_now]
        if ffn_keep < 1 or config.kv_keep < 1:
            # Widths shrink by the same share each step, towards the final targets.
            f = 1 - (1 - ffn_keep) * step / config.steps
            g = 1 - (1 - config.kv_keep) * step / config.steps
            say(f"layered-prune step {step}/{config.steps}: width to {f:.0%} FFN, {g:.0%} KV groups")
            weights = layer_sensitivity(loaded, batches, config.criterion_options())
            record["width"] = width.shrink(
                loaded, batches, ffn_keep_total=int(round(f * len(kept) * ffn_width0)),
                kv_keep_total=int(round(g * len(kept) * kv0)), layer_weights=weights,
                multiple=config.width_multiple)
        if config.recovery == "lsq":
            record["recovery"] = lsq_correct(loaded, teacher, kept, batches)
        elif distilling:
            record["recovery"] = distill(
                loaded, teacher, kept, batches,
                DistillOptions(minutes=minutes[step - 1], lr=config.lr,
                               ce_weight=config.ce_weight, seed=config.seed + step,
                               rank=config.recovery_rank, precision=config.recovery_precision,
                               device=config.device, holdout=config.recovery_holdout,
                               max_passes=None if passes is None else passes[step - 1]),
                label=f"recovery {step}/{config.steps}", targets=targets, lowrank=lowrank)
        steps.append(record)
    removed = sorted(set(range(n)) - set(kept))
    cache = ({"seconds": round(targets.seconds, 1), "megabytes": round(targets.bytes / 1e6, 1),
              "top_k": targets.top_k or None}
             if targets is not None else None)
    return {"teacher_targets": cache, "layers_before": n, "layers_after": len(kept), "removed": removed, "kept": kept,
            "criterion": config.criterion, "recovery": config.recovery, "steps": steps,
            "ffn_keep": ffn_keep, "kv_keep": config.kv_keep,
            "scoring_seconds": round(sum(s["selection"]["seconds"] for s in steps if "selection" in s), 3),
            "scoring_layer_evals": sum(s["selection"]["layer_evals"] for s in steps if "selection" in s),
            "scoring_head_evals": sum(s["selection"]["head_evals"] for s in steps if "selection" in s),
            "recovery_seconds": round(sum(s.get("recovery", {}).get("seconds", 0.0) for s in steps), 1)}


def _teacher_targets(teacher: LoadedModel, batches, top_k: int = 0, device: torch.device | None = None):
    """The teacher's outputs computed once for all recovery steps (compress/recovery.py), on
    `device`, kept in the CPU's memory when they take at most a quarter of the available memory
    there; otherwise the teacher runs live."""
    need = TeacherTargets.size_bytes(teacher, batches, top_k)
    room = memory_room()
    if not batches or need > room:
        say(f"recovery: teacher targets need {need / 1e9:.1f} GB, {room / 1e9:.1f} GB allowed; "
            "running the teacher live")
        return None
    with on_device([teacher.model], batches, device or "cpu") as placed:
        targets = TeacherTargets(teacher, placed, top_k)
    say(f"recovery: teacher targets for {len(batches)} batches in {targets.seconds:.0f} s "
        f"({targets.bytes / 1e9:.2f} GB{f', top {top_k} tokens' if targets.top_k else ''})")
    return targets
