"""Recovery after a pruning step: a closed-form least-squares correction, or distillation from
the unpruned model on the user's data within a wall-clock budget."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel, layer_hidden
from pocketformer.progress import say

RECOVERIES = ("none", "lsq", "distill")


@dataclass
class DistillOptions:
    minutes: float = 5.0
    lr: float = 5e-5
    kd_weight: float = 1.0        # KL(teacher || student) on output distributions / embeddings
    ce_weight: float = 1.0        # next-token cross-entropy on the user's text (decoders only)
    hidden_weight: float = 1.0    # normalised MSE of each kept layer's output vs its teacher layer
    seed: int = 0
    rank: int = 0                 # > 0: train a rank-r term beside each frozen linear (LowRank)
    precision: str = "fp32"       # fp32 | bf16 | auto: the student's forward/backward under
                                  # bf16 autocast (auto: only where native_bf16); parameters,
                                  # optimizer and losses stay fp32
    device: str = "cpu"           # where the student (and a live teacher) train: distill puts
                                  # them there and back; cached targets follow each batch
    holdout: float = 0.0          # > 0: this share of the batches is never trained on; the
                                  # loss on them is taken HOLDOUT_CHECKS times and the trained
                                  # parameters at its lowest are the ones kept (early stopping)
    max_passes: float | None = None   # > 0: stop after this many passes over the training
                                  # batches even if time is left; the learning-rate schedule then
                                  # follows whichever of time and passes is further along


HOLDOUT_CHECKS = 10   # held-out losses per recovery (plus one before the first step)


PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(value: str, field: str) -> None:
    if value not in PRECISIONS:
        raise BadInputError(f"expected one of {', '.join(PRECISIONS)}, got {value!r}", field=field)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device`: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 / AMX, which oneDNN reports. Elsewhere CPU bf16 is emulated: on an
    AVX2-only CPU a bf16-autocast training step of SmolLM2's FFN ran 31x slower than fp32
    (docs/layered_pruning.md, "Step buffering")."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device, label: str) -> str:
    """"auto" is bf16 where `device` runs it natively and fp32 elsewhere. An explicit "bf16"
    is kept, with a warning where it is emulated (a wall-clock budget then buys far fewer
    steps)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        say(f"{label}: warning: bf16 is emulated on this {device.type} (no native bf16 matmul): "
            "each step is many times slower than fp32; precision 'auto' picks fp32 here")
    return precision


def student_autocast(precision: str, device_type: str = "cpu"):
    """The context a student's forward (and so its backward) runs in: bf16 autocast on
    `device_type` for "bf16", a no-op for "fp32"."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_device(value: str, field: str) -> torch.device:
    """The torch device a training stage runs on: cpu, cuda or cuda:N, and only one that this
    process can use (a CUDA device needs a CUDA build of torch and a visible GPU)."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BadInputError(f"expected cpu, cuda or cuda:N, got {value!r}", field=field)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"{value!r} asked for, but this process sees no CUDA device "
                                f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                                "use cpu", field=field)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInputError(f"{value!r} asked for, but only {torch.cuda.device_count()} CUDA "
                                "device(s) are visible", field=field)
    return device


@contextmanager
def on_device(models: list[nn.Module], batches, device: torch.device | str):
    """For the block: the `models` on `device`, and the `batches` it yields copied there; the
    models go back to the CPU after it (also when it fails). A no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        yield batches
        return
    for model in models:
        model.to(device)
    try:
        yield [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b) for b in batches]
    finally:
        for model in models:
            model.to("cpu")


def device_name(device: torch.device | str | None) -> str:
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def _layer_outputs_hooks(layers, indices, store: dict):
    def make(i):
        def hook(mod, args, output):
            store[i] = layer_hidden(output)
        return hook
    return [layers[i].register_forward_hook(make(i)) for i in indices]


# ---- closed form --------------------------------------------------------------------------------

@torch.inference_mode()
def lsq_correct(loaded: LoadedModel, teacher: LoadedModel, kept: list[int], batches,
                ridge: float = 1e-2) -> dict:
    """For each gap of removed teacher layers, refit the FFN output projection W of the kept layer
    just before the gap so that its output matches the teacher's state after the gap:

        W = argmin sum_t ||x_mid,t + W u_t + b - target_t||^2 + lam ||W - W0||^2
          = (sum_t (target_t - x_mid,t - b) u_t^T + lam W0) (sum_t u_t u_t^T + lam I)^-1

    u is the FFN's hidden activation, x_mid the residual stream before the FFN adds to it
    (x_mid = x_out - W u - b), lam = ridge * tr(sum u u^T) / F. Valid for pre-norm blocks, where
    the FFN output is added straight to the residual stream.
    """
    adapter = loaded.adapter
    if not adapter.pre_norm:
        raise BadInputError(f"lsq recovery needs a pre-norm family; {loaded.family} normalises after "
                            "the residual add (use --recovery distill)", field="recovery")
    start = time.perf_counter()
    s_layers = adapter.layers(loaded.model)
    t_layers = adapter.layers(teacher.model)
    s_module = adapter.export_module(loaded)
    t_module = adapter.export_module(teacher)
    n_teacher = len(t_layers)
    gaps = []
    for pos, t_idx in enumerate(kept):
        nxt = kept[pos + 1] if pos + 1 < len(kept) else n_teacher
        if nxt > t_idx + 1:
            gaps.append((pos, t_idx, nxt))
    corrected = []
    for pos, t_idx, nxt in gaps:
        down = adapter.ffn(s_layers[pos]).output
        F = down.in_features
        A = torch.zeros(F, F, dtype=torch.float64)
        B = torch.zeros(down.out_features, F, dtype=torch.float64)
        grab: dict = {}
        h1 = down.register_forward_pre_hook(lambda m, a: grab.__setitem__("u", a[0]))
        h2 = _layer_outputs_hooks(s_layers, [pos], grab)
        t_store: dict = {}
        if nxt < n_teacher:
            h3 = [t_layers[nxt].register_forward_pre_hook(
                lambda m, a, kw: t_store.__setitem__("target", a[0] if a else kw["hidden_states"]),
                with_kwargs=True)]
        else:
            h3 = _layer_outputs_hooks(t_layers, [n_teacher - 1], t_store)
        try:
            for batch in batches:
                s_module(*batch)
                t_module(*batch)
                u = grab["u"].reshape(-1, F).double()
                x_out = grab[pos].reshape(-1, down.out_features).double()
                w_u = u @ down.weight.double().T
                bias = down.bias.double() if down.bias is not None else 0.0
                x_mid = x_out - w_u - bias
                target = t_store.get("target", t_store.get(n_teacher - 1)).reshape(-1, down.out_features).double()
                A += u.T @ u
                B += (target - x_mid - bias).T @ u
        finally:
            for h in [h1, *h2, *h3]:
                h.remove()
        lam = ridge * float(torch.trace(A)) / F
        W0 = down.weight.detach().double()
        W = torch.linalg.solve(A + lam * torch.eye(F, dtype=torch.float64), (B + lam * W0).T).T
        down.weight.copy_(W.float())
        down.__dict__.pop("pf_lowrank", None)   # no longer base + B A
        corrected.append({"student_layer": pos, "teacher_layer": t_idx, "gap_to": nxt})
    skipped = [k for k in range(kept[0])] if kept and kept[0] > 0 else []
    return {"recovery": "lsq", "corrected": corrected, "uncorrected_leading_gap": skipped,
            "ridge": ridge, "seconds": round(time.perf_counter() - start, 3)}


# ---- low-rank recovery --------------------------------------------------------------------------

class _Delta(nn.Module):
    """Parametrization weight = base + B @ A."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter):
        super().__init__()
        self.A, self.B = a, b

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.B @ self.A


class LowRank:
    """Recovery that leaves every linear's weight as it was and trains a rank-r term beside it:
    W = W0 + B A (A: r x in, B: out x r), the same factors carried over all recovery steps, so
    the final change to each linear has rank at most r whatever the number of steps. Between
    steps the term is merged into the weight (the next criterion sees the recovered model) and
    taken out again before the next recovery step.

    Why: the built-in SmolLM2 is a Q4_1 GGUF dequantised, so its linears lie on a 4-bit grid
    that the export can keep exactly (export/grid.py); full fine-tuning moves every weight by
    a fraction of a grid step, which any 4-bit rounding discards (docs/llm_race.md). With a
    low-rank recovery the export keeps W0 exactly and carries B A beside it."""

    def __init__(self, rank: int, seed: int = 0):
        self.rank = rank
        self.gen = torch.Generator().manual_seed(seed)
        self.factors: dict[int, tuple[nn.Linear, nn.Parameter, nn.Parameter]] = {}

    def attach(self, layers) -> None:
        """Take B A out of every linear of `layers` and re-express it as a parametrization (the
        factors become parameters of the model; its linears' own weights are frozen). New linears
        get A ~ N(0, 1/in) and B = 0 (no change)."""
        from torch.nn.utils import parametrize

        for layer in layers:
            for lin in [m for m in layer.modules() if isinstance(m, nn.Linear)]:
                prior = getattr(lin, "pf_lowrank", None)
                if id(lin) not in self.factors and prior is not None and prior[0].shape[0] == self.rank:
                    # factors of an earlier low-rank recovery (a saved model): continue them
                    self.factors[id(lin)] = (lin, nn.Parameter(prior[0].clone()), nn.Parameter(prior[1].clone()))
                if id(lin) not in self.factors:
                    a = torch.randn(self.rank, lin.in_features, generator=self.gen) / math.sqrt(lin.in_features)
                    b = torch.zeros(lin.out_features, self.rank)
                    self.factors[id(lin)] = (lin, nn.Parameter(a), nn.Parameter(b))
                _, a, b = self.factors[id(lin)]
                if a.device != lin.weight.device:      # drawn on the CPU (seeded), trained where
                    a.data, b.data = a.data.to(lin.weight.device), b.data.to(lin.weight.device)
                with torch.no_grad():
                    lin.weight.sub_(b @ a)
                parametrize.register_parametrization(lin, "weight", _Delta(a, b), unsafe=True)
                lin.parametrizations.weight.original.requires_grad_(False)

    def merge(self) -> None:
        """Fold B A back into plain weights (the model is an ordinary model again) and leave the
        factors on each linear as `pf_lowrank` (not a parameter: the state dict is unchanged;
        saved beside the weights by the adapter, export/grid.py reads them)."""
        from torch.nn.utils import parametrize

        for lin, a, b in self.factors.values():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
                lin.weight.requires_grad_(False)
            lin.pf_lowrank = (a.detach().to("cpu", copy=True), b.detach().to("cpu", copy=True))


# ---- distillation -------------------------------------------------------------------------------

class TeacherTargets:
    """The unpruned model's targets on the calibration batches, computed once and reused by every
    recovery step: its output (log-probabilities for decoders, the sentence embedding for
    encoders) and every layer's output, stored in fp16. Each distillation step then runs only
    the student: the teacher's forward pass (more layers than the student) and its log-softmax
    over the vocabulary were a third of a step's time on SmolLM2. The teacher never changes,
    so the targets are the numbers the live teacher would give, up to fp16 storage."""

    def __init__(self, teacher: LoadedModel, batches, top_k: int = 0):
        """`teacher` and `batches` may be on any device (on_device); the targets are kept in
        the CPU's memory and each distillation step copies its batch's to the student's device."""
        start = time.perf_counter()
        self.top_k = top_k if teacher.family != "bert" else 0
        adapter = teacher.adapter
        module = adapter.export_module(teacher)
        layers = adapter.layers(teacher.model)
        self.outputs: list[torch.Tensor] = []
        self.hidden: list[list[torch.Tensor]] = []
        store: dict = {}
        hooks = _layer_outputs_hooks(layers, range(len(layers)), store)
        try:
            with torch.no_grad():
                for batch in batches:
                    out = module(*batch).float()
                    if teacher.family == "bert":
                        self.outputs.append(out.to("cpu", torch.float16))
                    elif self.top_k:
                        logp, idx = torch.log_softmax(out, dim=-1).topk(self.top_k, dim=-1)
                        self.outputs.append(TopK(logp.to("cpu", torch.float16), idx.to("cpu", torch.int32)))
                    else:
                        self.outputs.append(torch.log_softmax(out, dim=-1).to("cpu", torch.float16))
                    self.hidden.append([store[i].detach().to("cpu", torch.float16)
                                        for i in range(len(layers))])
        finally:
            for h in hooks:
                h.remove()
        self.seconds = time.perf_counter() - start
        self.bytes = sum(o.nbytes for o in self.outputs) + sum(
            t.numel() * 2 for hs in self.hidden for t in hs)

    @staticmethod
    def size_bytes(teacher: LoadedModel, batches, top_k: int = 0) -> int:
        """What the cache would hold, to decide whether it fits."""
        cfg = teacher.model.config
        hidden = 2 * cfg.hidden_size * len(teacher.adapter.layers(teacher.model))
        if teacher.family == "vit":
            # a batch is images: one row of class log-probabilities each, and every layer's
            # states at the patches plus the CLS token
            images = sum(int(b[0].shape[0]) for b in batches)
            return images * (2 * cfg.num_labels + teacher.adapter.positions(cfg, 0) * hidden)
        tokens = sum(int(b[0].numel()) for b in batches)
        if teacher.family == "bert":
            out = 2 * cfg.hidden_size   # per token, an upper bound on one embedding per sentence
        else:
            out = 6 * top_k if top_k else 2 * cfg.vocab_size
        return tokens * (out + hidden)


def memory_room(share: float = 0.25) -> int:
    """`share` of the memory free now, in bytes: what a cache of teacher outputs may take."""
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * share)


class TeacherReplay:
    """What SEE's stages 1b and 2 read from the teacher on each calibration batch (its output
    and its last layer's output), kept from the first step that draws the batch, so that a later
    step on it runs no teacher forward: the teacher never changes, and its fp32 forward was 3.9 s
    of a 14 s SmolLM2 step. Per batch it keeps the last layer's output and, where the output is
    no larger than that (a sentence embedding, a row of class scores), the output itself. A
    decoder's logits (V per position) are not kept: they are replayed from the last layer's
    output through the teacher's own final norm and head (`output_features`, `output_head`),
    after the first batch has checked the replay against the live output (if it differs, every
    batch of such a model runs live). Kept in fp32 in the CPU's memory while the total fits in
    `room` bytes (default: a quarter of the free memory); later batches run the teacher live."""

    TOLERANCE = 1e-5        # the replay's largest difference / the output's largest magnitude

    def __init__(self, teacher: LoadedModel, room: int | None = None):
        self.teacher = teacher
        self.module = teacher.adapter.export_module(teacher)
        self.last = teacher.adapter.layers(teacher.model)[-1]
        self.kept: dict[int, tuple] = {}        # batch index -> (hidden, output or None, shape)
        self.room = memory_room() if room is None else room
        self.bytes = 0
        self.head_replays: bool | None = None   # decided by the first batch whose output is large
        self.live = self.replayed = 0

    def __call__(self, index: int, batch, need_output: bool = True):
        """(output, last layer's output) of the teacher on batch `index` (the output is None
        when not needed and not at hand)."""
        if index in self.kept:
            hidden, out, shape = self.kept[index]
            device = batch[0].device
            hidden = hidden.to(device)
            if out is not None:
                out = out.to(device)
            elif need_output:
                out = self._head(hidden, batch, shape)
            self.replayed += 1
            return out, hidden
        store: dict = {}
        hook = _layer_outputs_hooks([self.last], [0], store)[0]
        try:
            with torch.no_grad():
                out = self.module(*batch)
        finally:
            hook.remove()
        self.live += 1
        self._keep(index, batch, store[0], out)
        return out, store[0]

    @torch.no_grad()
    def _head(self, hidden: torch.Tensor, batch, shape: torch.Size) -> torch.Tensor:
        adapter = self.teacher.adapter
        features = adapter.output_features(self.teacher, hidden, batch)
        return adapter.output_head(self.teacher.model)(features).reshape(shape)

    def _keep(self, index: int, batch, hidden: torch.Tensor, out: torch.Tensor) -> None:
        small = out.numel() <= hidden.numel()
        if not small:
            if self.head_replays is None:
                self.head_replays = self._replay_matches(hidden, batch, out)
            if not self.head_replays:
                return
        size = 4 * (hidden.numel() + (out.numel() if small else 0))
        if self.bytes + size > self.room:
            return
        self.kept[index] = (hidden.detach().to("cpu", torch.float32, copy=True),
                            out.detach().to("cpu", torch.float32, copy=True) if small else None,
                            out.shape)
        self.bytes += size

    def _replay_matches(self, hidden: torch.Tensor, batch, out: torch.Tensor) -> bool:
        if self.teacher.adapter.output_head(self.teacher.model) is None:
            return False
        try:
            replay = self._head(hidden, batch, out.shape)
        except (RuntimeError, NotImplementedError):
            return False
        err = float((replay.float() - out.float()).abs().max() / out.float().abs().max().clamp_min(1e-12))
        if err > self.TOLERANCE:
            say(f"teacher replay: the head on the last layer's output differs from the output by "
                f"{err:.1e} of its scale; the teacher runs live on every batch")
            return False
        return True

    def record(self) -> dict:
        return {"live": self.live, "replayed": self.replayed, "batches_kept": len(self.kept),
                "megabytes": round(self.bytes / 1e6, 1)}


@dataclass
class TopK:
    """The teacher's k most probable tokens per position: log-probabilities (fp16) and ids."""
    logp: torch.Tensor
    index: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.logp.nbytes + self.index.nbytes

    def to(self, device: torch.device) -> "TopK":
        return TopK(self.logp.to(device), self.index.to(device))


def _holdout_split(n: int, share: float) -> tuple[list[int], list[int]]:
    """Batch indices to train on and to hold out. The held-out ones are drawn from a fixed seed,
    so every recovery step of a run (each with its own training seed) holds out the same text."""
    if share == 0:
        return list(range(n)), []
    held_n = int(round(n * share))
    if not 0 < share < 0.5 or held_n < 1 or held_n >= n:
        raise BadInputError(f"a held-out share of {share} of {n} calibration batches leaves "
                            "none to train on or none to hold out: use a share in (0, 0.5) and "
                            "more calibration samples", field="recovery_holdout")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(perm[held_n:]), sorted(perm[:held_n])


def _kd_loss(family: str, s_out: torch.Tensor, t_out, *, t_is_logp: bool = False,
             s_logp: torch.Tensor | None = None) -> torch.Tensor:
    if family == "bert":
        return (1 - nn.functional.cosine_similarity(s_out, t_out.to(s_out.dtype), dim=-1)).mean()
    if s_logp is None:
        s_logp = torch.log_softmax(s_out.float(), dim=-1)
    if isinstance(t_out, TopK):
        return _topk_kl(t_out, s_logp)
    t_logp = t_out.float() if t_is_logp else torch.log_softmax(t_out.float(), dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def next_token_loss(s_logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A decoder's mean next-token cross-entropy on its own input: position t's
    log-probabilities `s_logp` (batch x positions x V) scored on the token at t + 1 of `ids`."""
    return -s_logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).mean()


def _topk_kl(t: TopK, s_logp: torch.Tensor) -> torch.Tensor:
    """KL between the teacher and the student over k + 1 outcomes: the teacher's top-k tokens
    and "any other token" (whose probability is 1 minus the top-k mass on each side). This is
    the KL of both distributions coarsened to the same partition of the vocabulary, so it is at
    most the full KL (data processing) and equals it when the other tokens' conditional
    distributions agree; with k = 64 the top-k mass of SmolLM2 on WikiText is most of the
    distribution (docs/layered_pruning.md)."""
    t_logp = t.logp.float()
    s_top = s_logp.gather(-1, t.index.long())
    t_p = t_logp.exp()
    kl = (t_p * (t_logp - s_top)).sum(-1)
    t_rest = (1 - t_p.sum(-1)).clamp_min(1e-6)
    s_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-6)
    return (kl + t_rest * (t_rest.log() - s_rest.log())).mean()


def distill(loaded: LoadedModel, teacher: LoadedModel, kept: list[int], batches,
            opts: DistillOptions, *, label: str = "distill",
            targets: TeacherTargets | None = None, lowrank: LowRank | None = None) -> dict:
    """_distill_placed on opts.device: the student (and the teacher, when it runs live) and the
    batches go there for the recovery and the models come back to the CPU after it."""
    live = [teacher.model] if targets is None else []
    with on_device([loaded.model, *live], batches, opts.device) as placed:
        return _distill_placed(loaded, teacher, kept, placed, opts, label=label, targets=targets,
                               lowrank=lowrank)


def steps_for_passes(max_passes: float | None, batches: int) -> int | None:
    """The step cap of `max_passes` passes over `batches` batches (at least 1); None: no cap."""
    return None if max_passes is None else max(1, math.ceil(max_passes * batches))


def schedule_progress(elapsed: float, budget_s: float, steps: int, max_steps: int | None
                      ) -> tuple[float, str | None]:
    """How far a training budget is through its schedule: the larger of the share of the time
    spent and, with a step cap, the share of the steps made; and, once that reaches 1, what
    ended it ("passes" when the steps got there first, else "time"), None before."""
    time_frac = elapsed / budget_s if budget_s > 0 else 1.0
    step_frac = steps / max_steps if max_steps is not None else 0.0
    frac = max(time_frac, step_frac)
    return frac, (("passes" if step_frac > time_frac else "time") if frac >= 1.0 else None)


def _distill_placed(loaded: LoadedModel, teacher: LoadedModel, kept: list[int], batches,
                    opts: DistillOptions, *, label: str,
                    targets: TeacherTargets | None, lowrank: LowRank | None) -> dict:
    """Train the pruned model (all but the token embeddings and LM head) against the unpruned one
    on the calibration batches until the wall-clock budget runs out: output KD (KL for distributions, 1 - cos for embeddings), the
    next-token loss on the user's text for decoders, and each kept layer's output matched to its
    teacher layer (MSE normalised by the teacher state's energy). AdamW, linear warm-up over the
    first 5% of the budget and linear decay to zero at its end (time-based, since the number of
    steps a budget buys is not known in advance). With `targets` (the teacher's outputs on the
    same batches, computed once) only the student runs. With `lowrank` (opts.rank > 0) the
    linears of the kept layers stay frozen and a rank-r term beside each is trained instead
    (LowRank), with the remaining parameters (norms, biases)."""
    adapter = loaded.adapter
    model = loaded.model
    if not batches:
        raise BadInputError("distillation needs calibration data", field="calibration")
    budget = opts.minutes * 60.0
    train, held = _holdout_split(len(batches), opts.holdout)
    if opts.max_passes is not None and not opts.max_passes > 0:
        raise BadInputError("must be > 0 (passes over the calibration batches)",
                            field="recovery_max_passes")
    max_steps = steps_for_passes(opts.max_passes, len(train))
    device = torch.device(opts.device)
    precision = resolve_precision(opts.precision, device, label)
    torch.manual_seed(opts.seed)
    s_module = adapter.export_module(loaded)
    t_module = adapter.export_module(teacher)
    s_layers, t_layers = adapter.layers(model), adapter.layers(teacher.model)
    # Token embeddings and the (tied) LM head stay frozen: their gradient is a dense V x d update
    # per step, about a quarter of the backward cost of a small decoder, and the table is what
    # SEE compresses separately.
    frozen = {id(p) for mod in (adapter.embeddings(model), adapter.lm_head(model)) if mod is not None
              for p in mod.parameters()}
    if opts.rank:
        if lowrank is None or lowrank.rank != opts.rank:
            raise ValueError("rank > 0 needs a LowRank store of the same rank")
        lowrank.attach(s_layers)
        # factors of linears in layers removed by earlier steps stay in the store, unattached
        frozen |= {id(lin.parametrizations.weight.original) for lin, _, _ in lowrank.factors.values()
                   if hasattr(lin, "parametrizations")}
    else:
        for mod in model.modules():   # the weights themselves are trained: no longer base + B A
            if hasattr(mod, "pf_lowrank"):
                del mod.pf_lowrank
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    s_store: dict = {}
    t_store: dict = {}
    hooks = _layer_outputs_hooks(s_layers, range(len(s_layers)), s_store)
    if targets is None:
        hooks += _layer_outputs_hooks(t_layers, kept, t_store)
    gen = torch.Generator().manual_seed(opts.seed)
    steps = tokens = 0
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None

    def batch_loss(bi: int) -> torch.Tensor:
        batch = batches[bi]
        if targets is None:
            with torch.no_grad():
                t_out = t_module(*batch)
            t_layers_out = t_store
        else:
            t_out = targets.outputs[bi].to(device)
            t_layers_out = {i: targets.hidden[bi][i].to(device) for i in kept}
        with student_autocast(precision, device.type):
            s_out = s_module(*batch)
        # one log-softmax of the student serves the KL and the next-token loss
        s_logp = None if loaded.family == "bert" else torch.log_softmax(s_out.float(), dim=-1)
        loss = opts.kd_weight * _kd_loss(loaded.family, s_out, t_out,
                                         t_is_logp=targets is not None, s_logp=s_logp)
        if opts.ce_weight and loaded.family == "llama":
            loss = loss + opts.ce_weight * next_token_loss(s_logp, batch[0])
        if opts.hidden_weight:
            h = 0.0
            for pos, t_idx in enumerate(kept):
                s, t = s_store[pos].float(), t_layers_out[t_idx].detach().float()
                h = h + ((s - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean()
            loss = loss + opts.hidden_weight * h / len(kept)
        return loss

    def check_held() -> None:
        """The loss on the held-out batches now; the parameters are kept when it is the lowest."""
        nonlocal best
        with torch.no_grad():
            value = sum(float(batch_loss(bi)) for bi in held) / len(held)
        curve.append((steps, value))
        if best is None or value < best[0]:
            best = (value, steps, [p.detach().clone() for p in params])

    start = time.perf_counter()
    model.eval()   # no dropout: recovery is deterministic for a seed
    next_check = 0.0
    stopped_by = None
    try:
        while True:
            order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
            for bi in order:
                elapsed = time.perf_counter() - start
                # progress through the schedule: time spent, or passes made when capped
                frac, stopped_by = schedule_progress(elapsed, budget, steps, max_steps)
                if stopped_by is not None:
                    raise StopIteration
                if held and frac >= next_check:
                    check_held()
                    next_check += 1.0 / HOLDOUT_CHECKS
                for group in opt.param_groups:
                    group["lr"] = opts.lr * min(1.0, frac / 0.05) * (1.0 - frac)
                loss = batch_loss(bi)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                steps += 1
                tokens += int(batches[bi][0].numel())
                losses.append(loss.item())
                if steps == 1 or steps % 10 == 0:
                    say(f"{label}: step {steps}, loss {losses[-1]:.4f}, "
                        f"{elapsed:.0f}/{budget:.0f} s")
    except StopIteration:
        if held:
            check_held()        # the end of the schedule is a candidate too
            with torch.no_grad():
                for p, kept_value in zip(params, best[2]):
                    p.copy_(kept_value)
            say(f"{label}: held-out loss {curve[0][1]:.4f} at step 0, lowest {best[0]:.4f} at "
                f"step {best[1]} of {steps}; the parameters of step {best[1]} are kept")
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
        if lowrank is not None:
            lowrank.merge()
    head = losses[: max(1, min(5, len(losses)))]
    tail = losses[-max(1, min(5, len(losses))):]
    return {"recovery": "distill", "steps": steps, "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 1), "budget_seconds": budget,
            "passes": round(steps / len(train), 3), "stopped_by": stopped_by,
            **({"max_passes": opts.max_passes, "max_steps": max_steps} if max_steps else {}),
            "loss_step1": losses[0] if losses else math.nan,
            "loss_first": float(sum(head) / len(head)) if losses else math.nan,
            "loss_last": float(sum(tail) / len(tail)) if losses else math.nan, "lr": opts.lr,
            "precision": precision, "device": device_name(device),
            **({"precision_asked": opts.precision} if opts.precision != precision else {}),
            **({"holdout_batches": len(held), "holdout_curve": [[k, round(v, 5)] for k, v in curve],
                "holdout_best_step": best[1], "holdout_best_loss": best[0]} if held else {}),
            **({"rank": opts.rank, "trained_params": sum(p.numel() for p in params)} if opts.rank else {})}
