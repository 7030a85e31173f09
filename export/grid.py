"""4-bit export that keeps an asymmetric block grid exactly, plus a low-rank term beside it.

Why: the built-in SmolLM2 is a Q4_1 GGUF dequantised (pocketformer/models), so every linear's
weights already lie on Q4_1's grid: blocks of g = 32 input channels of one output row, each weight
    w = d q + m,   q in 0..15,  d, m one scale and one minimum per block.
XNNPACK's 4-bit kernels take *symmetric* blocks (w = s q', q' in -8..7), so rounding those weights
again to a symmetric grid (RTN, or rotation + GPTQ) loses what llama.cpp keeps for free
(docs/llm_race.md). Rewrite each block instead:
    w = d (q - 8) + (m + 8 d)
The first term is a symmetric block with s = d and q' = q - 8, exactly. The second is constant over
the block, so its product with an input x is that constant times the block's sum of x:
    W x = (D o (Q - 8)) x + C s(x),   C = M + 8 D  (out x in/g),   s(x) = P^T x  (in/g block sums)
A linear whose weight came from a low-rank recovery (compress/recovery.py LowRank: W = W0 + B A,
W0 on the grid, B A a fraction of a grid step that any 4-bit rounding would discard) is written as
    W x = (D o (Q - 8)) x + C s(x) + B (A x)
with Q, D, M the grid of W - B A. Both side terms share one bottleneck: side_in = [P^T; A]
and side_out = [C, B], both 8da8w, so the program runs, per linear, one 8da4w linear over x and
one (in/g + r)-wide side pair (GridLinear).

Weights that are not on such a grid get Q4_1's own rounding (d = (max - min) / 15, m = min,
q = round((w - m) / d)): asymmetric round-to-nearest, which costs less than symmetric (1.18x vs
1.32x perplexity on the pruned SmolLM2 in eager PyTorch, docs/llm_race.md), and the report says how
many blocks were exact. What still differs from fp32: activations are quantized to int8 per token
(8da4w), the block scale d is stored in bf16 by the lowering (about 3 significant digits), and
the side pair's weights are int8 (GridLinear).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel

LEVELS = 15          # q in 0..15 (4 bits)
OFFSET = 8           # symmetric int4 is q - 8 in -8..7


@dataclass
class GridReport:
    group: int
    linears: int = 0
    with_lowrank: int = 0
    lowrank_rank: int = 0
    blocks: int = 0
    exact_blocks: int = 0          # blocks whose weights the grid reproduces to 1e-6 of the block's range
    side_params: int = 0           # fp32 parameters of the side linears
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["names"] = len(self.names)
        d["exact_share"] = round(self.exact_blocks / self.blocks, 6) if self.blocks else 0.0
        return d


def asymmetric_blocks(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1's rounding of w (out x in) in blocks of `group` input channels: integers q (0..15, int8),
    scales d and minima m (fp32, out x in/group each), with w ~ d q + m blockwise."""
    o, i = w.shape
    b = w.double().reshape(o, i // group, group)
    lo, hi = b.amin(-1), b.amax(-1)
    d = (hi - lo) / LEVELS
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((b - lo.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, LEVELS)
    return q.reshape(o, i).to(torch.int8), d.float(), lo.float()


def dequantize_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int) -> torch.Tensor:
    o, i = q.shape
    return (q.double().reshape(o, i // group, group) * d.double().unsqueeze(-1)
            + m.double().unsqueeze(-1)).reshape(o, i).float()


class GridLinear(nn.Module):
    """base(x) + side_out(side_in(x)).

    base: a symmetric 4-bit linear (its integers and scales in `pf_rounding`, written into the
    quantized tensors by export/gptq.py apply_rounding).
    side_in = [P^T; A] ((in/g + r) x in): the 0/1 block-sum rows and the low-rank A; quantized
    8da8w (marked `pf_side` for export/quantize.py): the 0/1 rows are exact in int8, and the
    block sums are then those of the same int8-quantized activations the 4-bit linear reads, as in llama.cpp's
    Q4_1 x Q8_1 dot product; A is rounded per row.
    side_out = [C, B] (out x (in/g + r)): 8da8w as well. Rounding C per output row to int8
    moves it by up to ~0.1 grid step, yet measured on the pruned SmolLM2 (eager, 12 held-out
    windows) int8 side_out gave 40.99 perplexity against 41.01 with fp32 (fp32 model 40.56), and
    fp32 side weights cost 13 MB more memory traffic per token (race: decode 161 tok/s with fp32,
    282 with int8, two races minutes apart on this machine, docs/llm_race.md).
    (Sums as a matrix product, not a reshape + mean: reshapes with a symbolic length do not lower
    to XNNPACK and split the delegate into many partitions.)"""

    def __init__(self, base: nn.Linear, side_in: nn.Linear, side_out: nn.Linear):
        super().__init__()
        self.base, self.side_in, self.side_out = base, side_in, side_out
        side_in.pf_side = side_out.pf_side = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.side_out(self.side_in(x))


def grid_linear(lin: nn.Linear, group: int, report: GridReport) -> GridLinear:
    """The GridLinear computing `lin` (module doc), recording exactness in `report`."""
    w = lin.weight.detach().float()
    out_f, in_f = w.shape
    ab = getattr(lin, "pf_lowrank", None)
    if ab is not None and not (ab[0].shape[1] == in_f and ab[1].shape[0] == out_f):
        ab = None
    base_w = w - ab[1] @ ab[0] if ab is not None else w
    q, d, m = asymmetric_blocks(base_w, group)
    rebuilt = dequantize_blocks(q, d, m, group)
    err = (rebuilt - base_w).abs().reshape(out_f, in_f // group, group).amax(-1)
    scale = (d * LEVELS).clamp_min(1e-12)
    report.blocks += err.numel()
    report.exact_blocks += int((err <= 1e-6 * scale).sum())
    n_blocks = in_f // group
    rank = ab[0].shape[0] if ab is not None else 0
    base = nn.Linear(in_f, out_f, bias=lin.bias is not None)
    sym = q.to(torch.int8) - OFFSET
    with torch.no_grad():
        base.weight.copy_((sym.float().reshape(out_f, n_blocks, group) * d.unsqueeze(-1)).reshape(out_f, in_f))
        if lin.bias is not None:
            base.bias.copy_(lin.bias.detach())
    base.weight.requires_grad_(False)
    base.pf_rounding = (sym, d.clone(), group)
    side_in = nn.Linear(in_f, n_blocks + rank, bias=False)
    side_out = nn.Linear(n_blocks + rank, out_f, bias=False)
    with torch.no_grad():
        side_in.weight.zero_()
        side_in.weight[:n_blocks] = torch.repeat_interleave(torch.eye(n_blocks), group, dim=1)
        side_out.weight[:, :n_blocks] = m + OFFSET * d
        if ab is not None:
            side_in.weight[n_blocks:] = ab[0]
            side_out.weight[:, n_blocks:] = ab[1]
    for mod in (side_in, side_out):
        mod.weight.requires_grad_(False)
        report.side_params += mod.weight.numel()
    report.linears += 1
    if ab is not None:
        report.with_lowrank += 1
        report.lowrank_rank = max(report.lowrank_rank, rank)
    return GridLinear(base, side_in, side_out)


def grid_model(loaded: LoadedModel, group: int = 32) -> tuple[LoadedModel, GridReport]:
    """A copy of `loaded` whose linears inside its layers are GridLinear (the token embedding and
    the output head are left to the quantizer's own schemes). Every such linear's input width
    must be a multiple of `group`."""
    adapter = loaded.adapter
    work = LoadedModel(adapter, copy.deepcopy(loaded.model), loaded.tokenizer, loaded.source,
                       dict(loaded.extras), list(loaded.history), loaded.origin)
    report = GridReport(group)
    layers = adapter.layers(work.model)
    bad = [(name, m.in_features) for name, m in layers.named_modules()
           if isinstance(m, nn.Linear) and m.in_features % group]
    if bad:
        raise BadInputError(f"grid rounding needs every input width to be a multiple of group "
                            f"{group}; {bad[0][0]} has {bad[0][1]}", field="group_size")
    for lname, layer in layers.named_children():
        for name, parent in list(layer.named_modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, grid_linear(child, group, report))
                    report.names.append(f"layers.{lname}.{name + '.' if name else ''}{child_name}")
    return work, report
