"""Quantization plans for the two runtimes, with the skip list and its budget made explicit.

ExecuTorch (torchao `quantize_`, lowered to XNNPACK):
    int8   every nn.Linear: int8 weights per output channel, int8 dynamic per-token activations
           (8da8w). Embeddings stay fp32.
    8da4w  every nn.Linear: int4 weights in groups of `group_size` input channels (0: one scale
           per output channel over the whole input width), int8 dynamic activations; every
           nn.Embedding (and a tied LM head's table, which is untied first): int8 weights per
           row. `lm_head="int8"` gives the output head 8da8w (int8 weights per
           output channel) instead, as llama.cpp keeps its output/token table at 8 bits (Q8_0) in
           its 4-bit files: the head is the linear whose rounding error reaches every logit.
ONNX Runtime:
    int8   `quantize_dynamic` over MatMul/Gemm: int8 weights per output channel (signed, symmetric),
           uint8 dynamic activations, no reduce_range (that is an x86 AVX2 saturation workaround;
           ARM's sdot/udot kernels use the full range; on such an x86 host the Python checks run
           the file's exact u8u8 twin instead, export/runtimes.py).
           With calibration data an RMSNorm decoder is rotated and smoothed first
           (export/rotate.py, exporters._prepare_int8_onnx).
    8da4w  not offered for ONNX (ORT's 4-bit MatMulNBits is a contrib op the mobile builds do not
           all carry); asking for it is a bad-input error naming the format.

A grouped scheme silently skips a linear whose input width is not a multiple of the group size
(torchao's filter, and ExecuTorch's own export script, do exactly that). Here the group size is
chosen to divide every quantized width unless the user forces one, and whatever is left
unquantized is listed by name; `max_unquantized_share` (share of linear weights) is the gate.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pocketformer.errors import BadInputError, BudgetError

SCHEMES = ("fp32", "int8", "8da4w")
HEAD_SCHEMES = ("int4", "int8")
# Quality first: 32 is the group ExecuTorch's LLM recipes use for 8da4w; on SmolLM2 it keeps
# perplexity at 1.51x dense against 2.39x for 192 (docs/export.md), for ~14% more bytes.
# Larger groups are the fallback when a width is not a multiple of 32.
GROUP_CANDIDATES = (32, 64, 128, 256, 192, 96, 16)
# Size first: once the stream is rotated and the weights GPTQ-rounded, the group costs little
# quality (SmolLM2: 1.094x at 32, 1.110x at 192, eager; docs/export.md) and 192 saves 7 MB.
GROUP_CANDIDATES_SIZE_FIRST = (256, 192, 128, 96, 64, 32, 16)


@dataclass
class QuantPlan:
    scheme: str
    group_size: int | None                       # None: per output channel
    quantized: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)   # {name, in_features, params, reason}
    embeddings: str = "fp32"
    lm_head: str = "fp32"
    linear_params: int = 0
    unquantized_params: int = 0
    calibrated: int = 0                          # linears written with calibrated rounding
    gptq: dict | None = None                     # the calibrated rounding's report
    rotation: dict | None = None                 # the residual-stream rotation's (export/rotate.py)
    side_params: int = 0                         # side linears of grid rounding (export/grid.py)
    int8_linears: list[str] = field(default_factory=list)   # 8da4w: linears kept at 8 bits by name

    @property
    def unquantized_share(self) -> float:
        return self.unquantized_params / self.linear_params if self.linear_params else 0.0

    @property
    def rounding(self) -> str:
        """rtn; gptq when calibrated integers were written (export/gptq.py); grid when the
        integers are an asymmetric block grid's (export/grid.py)."""
        if self.calibrated and self.gptq and self.gptq.get("method") == "grid":
            return "grid"
        return "gptq" if self.calibrated else "rtn"

    def to_dict(self) -> dict:
        return {**asdict(self), "unquantized_share": round(self.unquantized_share, 6),
                "quantized": len(self.quantized), "rounding": self.rounding}


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears a scheme quantizes: all but the side pairs of grid rounding (`pf_side`, always
    8da8w per channel)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and not getattr(m, "pf_side", False)]


def name_matches(name: str, patterns) -> bool:
    """Whether a module name matches one of the glob `patterns`, whole or as a dotted suffix:
    "v_proj" and "self_attn.v_proj" match "model.layers.3.self_attn.v_proj"; "layers.0.*" the
    first layer's linears (names differ by prefix between the model, the generation wrapper and
    GPTQ's per-layer walk, so a pattern names the end of the path)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def int8_names(module: nn.Module, patterns) -> list[str]:
    """The linears of `module` that `patterns` keep at 8 bits; a pattern matching none is bad input
    (a typo would otherwise export an all-4-bit program without a word)."""
    names = [n for n, _ in _linears(module)]
    for p in patterns:
        if not any(name_matches(n, [p]) for n in names):
            raise BadInputError(f"pattern {p!r} matches no linear of the model (e.g. "
                                f"{', '.join(names[:3])})", field="export.int8_linears")
    return [n for n in names if name_matches(n, patterns)]


def choose_group_size(widths: list[int], *, size_first: bool = False) -> int:
    """The first candidate group that divides every width, so nothing is skipped: in quality
    order (smallest useful group first), or with `size_first` the largest."""
    candidates = GROUP_CANDIDATES_SIZE_FIRST if size_first else GROUP_CANDIDATES
    for g in candidates:
        if all(w % g == 0 for w in widths):
            return g
    return candidates[-1]


def group_for(module: nn.Module, group_size: int | None = None, *, size_first: bool = False) -> int:
    """The 8da4w group of `module`: the one asked for (0: one scale per output channel, the
    whole input width), else the first candidate dividing every linear's input width (export and
    GPTQ rounding must agree on it)."""
    if group_size is not None:
        return group_size
    return choose_group_size([m.in_features for _, m in _linears(module)],
                                           size_first=size_first)


def untie_output_head(adapter, model: nn.Module) -> None:
    """Before rounding or rotating a copy of a model: give an output head tied to the token
    embedding its own weight, so changing the head leaves the table alone, and mark it, so the
    quantization plan still reports the untie (`_untie_head`)."""
    head, emb = adapter.output_head(model), adapter.embeddings(model)
    if head is not None and emb is not None and getattr(emb, "weight", None) is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        head.pf_untied = True


def _untie_head(module: nn.Module) -> bool:
    """Give a tied LM head its own weight, so the head can be quantized as a linear and the
    embedding as a table. Returns whether a tie was found."""
    embeds = {id(m.weight): n for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    tied = False
    for _, lin in _linears(module):
        tied = tied or bool(getattr(lin, "pf_untied", False))   # untied earlier (untie_output_head)
        if id(lin.weight) in embeds:
            lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
            tied = True
    return tied


def output_head(module: nn.Module) -> nn.Linear | None:
    """The LM head of `module`: the last linear whose outputs are as many as an embedding's rows."""
    vocab = {m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)}
    heads = [m for _, m in _linears(module) if m.out_features in vocab]
    return heads[-1] if heads else None


@contextlib.contextmanager
def xnnpack_int4_per_channel():
    """While lowering to XNNPACK: int4 weights with one scale per output channel run on XNNPACK's
    per-channel QC4W kernels with fp32 scales.

    torchao writes such a weight (`--group-size 0`) as one block as wide as the row. ExecuTorch
    1.x's XNNPACK lowering (`operators/quant_params.py`) keeps int4 blocks on the block-wise
    QB4W kernels even then (its comment: mapping them to QC4W "need[s] more fixes ... incorrect
    scales"), and block-wise scales are serialised in bf16 (`node_visitor.get_quant_params`),
    which moved a tiny 8da4w model's outputs by 1% of their size. The missing fix is to pass the
    per-row scales and zero points as vectors, which this does for blocks that span the row, so
    the weights take ExecuTorch's per-channel path (the one its PT2E quantizer's int4 weights
    take). Measured on this project's machine: the 4-bit linears of a decode step 0.86x the
    time (benchmarks/xnnpack_decode_linears.py), a 128-token prefill of the pruned SmolLM2
    1.78x faster, outputs equal to the eager module's to float rounding (docs/llm_race.md)."""
    from executorch.backends.xnnpack.operators import quant_params as qp

    original = qp.QuantParams.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        scale, zp = self.scale, self.zp
        if (self.is_qc4w and self.per_channel_group and isinstance(scale, torch.Tensor)
                and scale.ndim == 2 and scale.shape[1] == 1):
            self.per_channel_group, self.group_size = False, 0
            self.scale = scale.squeeze(1)
            if isinstance(zp, torch.Tensor) and zp.ndim == 2:
                self.zp = zp.squeeze(1)

    qp.QuantParams.__init__ = init
    try:
        yield
    finally:
        qp.QuantParams.__init__ = original


def quantize_for_executorch(module: nn.Module, scheme: str, group_size: int | None = None,
                            lm_head: str = "int4", int8_linears=()) -> tuple[nn.Module, QuantPlan]:
    """A quantized copy of `module` (the original is untouched) and the plan that was applied.
    `lm_head` (8da4w): int4 like every other linear, or int8 (8da8w per output channel).
    `int8_linears` (8da4w): name patterns (`name_matches`) of linears kept at 8da8w per output
    channel, as llama.cpp's Q4_K_M keeps attn_v at 6 bits: the few whose 4-bit rounding costs
    the most quality for their size (docs/export.md, "Linears kept at 8 bits")."""
    if lm_head not in HEAD_SCHEMES:
        raise BadInputError(f"expected one of {', '.join(HEAD_SCHEMES)}, got {lm_head!r}", field="lm_head")
    if scheme not in SCHEMES:
        raise BadInputError(f"expected one of {', '.join(SCHEMES)}, got {scheme!r}", field="quantize")
    if int8_linears and scheme != "8da4w":
        raise BadInputError(f"keeping linears at 8 bits is for 8da4w programs; the scheme is {scheme}",
                            field="export.int8_linears")
    if scheme == "fp32":
        return module, QuantPlan("fp32", None)
    from torchao.quantization import (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig,
                                      quantize_)
    from torchao.quantization.granularity import PerAxis, PerGroup

    module = copy.deepcopy(module).eval()
    tied = _untie_head(module) if scheme == "8da4w" else False
    linears = _linears(module)
    # None: one scale per output channel (int8; 8da4w with group 0, XNNPACK's QC4W kernels
    # once lowered under xnnpack_int4_per_channel)
    group = None if scheme == "int8" else (group_for(module, group_size) or None)
    plan = QuantPlan(scheme, group)
    plan.linear_params = sum(m.weight.numel() for _, m in linears)
    sides8 = {id(m): m for m in module.modules() if getattr(m, "pf_side", False)}
    plan.side_params = sum(m.weight.numel() for m in sides8.values())
    # an int8 head is per output channel, so no group has to divide its width
    head8 = output_head(module) if scheme == "8da4w" and lm_head == "int8" else None
    by_name = dict(linears)
    plan.int8_linears = int8_names(module, int8_linears) if int8_linears else []
    keep8 = {id(by_name[n]) for n in plan.int8_linears}
    if head8 is not None:
        keep8.add(id(head8))
    chosen = set()
    for name, m in linears:
        if group is not None and m.in_features % group and id(m) not in keep8:
            plan.skipped.append({"name": name, "in_features": m.in_features,
                                 "params": m.weight.numel(),
                                 "reason": f"in_features {m.in_features} is not a multiple of group {group}"})
            plan.unquantized_params += m.weight.numel()
        else:
            chosen.add(id(m))
            plan.quantized.append(name)
    weight_dtype = torch.int8 if scheme == "int8" else torch.int4
    granularity = PerAxis(0) if group is None else PerGroup(group)
    with torch.no_grad():
        quantize_(module, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity),
            filter_fn=lambda m, fqn: id(m) in chosen and id(m) not in keep8)
        if keep8 or sides8:
            # 8da8w per output channel: an int8 head, linears kept at 8 bits by name, and grid
            # rounding's side inputs (export/grid.py)
            quantize_(module, Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                filter_fn=lambda m, fqn: id(m) in keep8 or id(m) in sides8)
        if scheme == "8da4w":
            from pocketformer.export.gptq import apply_rounding
            plan.calibrated = apply_rounding(module)
            embeds = [m for _, m in module.named_modules() if isinstance(m, nn.Embedding)]
            if embeds:
                # padding_idx only masks gradients, but it adds an argument to aten.embedding
                # that ExecuTorch's embedding_byte fusion pattern does not match, leaving a
                # torchao dequantize_affine with no kernel (SmolLM2 has pad_token_id 2).
                for m in embeds:
                    m.padding_idx = None
                quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                          filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
                plan.embeddings = "int8 weight-only, one scale per row"
    head_desc = ("untied from the embedding; " if tied else "") + (
        "8da8w per channel" if scheme == "int8" or head8 is not None else f"8da4w, group {group}")
    plan.lm_head = head_desc
    return module, plan


def check_plan(plan: QuantPlan, max_unquantized_share: float) -> None:
    """The skip gate: exit code 3, naming the layers, when too much is left in fp32."""
    if plan.scheme != "fp32" and plan.unquantized_share > max_unquantized_share:
        names = ", ".join(f"{s['name']} ({s['in_features']})" for s in plan.skipped[:12])
        more = f" and {len(plan.skipped) - 12} more" if len(plan.skipped) > 12 else ""
        raise BudgetError(
            f"quantization gate: {plan.unquantized_share:.1%} of linear weights left unquantized "
            f"by {plan.scheme} group {plan.group_size} (budget {max_unquantized_share:.1%}): "
            f"{names}{more}", field="export.max_unquantized_share")


def quantize_onnx_dynamic(src, dst) -> dict:
    """ONNX Runtime int8 dynamic quantization with ARM-appropriate settings (see module doc)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"op_types_to_quantize": ["MatMul", "Gemm"], "per_channel": True,
                "reduce_range": False, "weight_type": "QInt8"}
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=False, op_types_to_quantize=["MatMul", "Gemm"])
    return settings
