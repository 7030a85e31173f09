"""Calibrated 4-bit rounding (GPTQ) for the 8da4w scheme.

Round-to-nearest (RTN) puts every weight on the closest point of its group's 4-bit grid,
independently. GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023) rounds the input columns of a linear one at a time and
pushes each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian of the layer's reconstruction loss ||W X - W_q X||^2, H = 2 X X^T / n, estimated on
calibration inputs X. The grid itself is the one ExecuTorch's 8da4w kernels run: symmetric int4
q in [-8, 7], one scale per `group` input channels, w = q * s, with s rounded to bfloat16 (the
precision XNNPACK keeps its block scales in).

What is implemented here, step by step (names as in the paper's Algorithm 1):
- H = 2/n sum X^T X over the calibration tokens entering the linear; dead inputs (H_ii = 0) get
  H_ii = 1 and zero weight; dampening lambda = `damp` * mean(diag H) on the diagonal.
- U = chol(H^-1)^T (upper), computed once; columns are processed in blocks of `block` (a multiple of
  the group) with the lazy batch update of the paper.
- A group's scale is chosen when the group's first column is reached, from the group's weights as
  updated so far: s = c * max|w| / 7.5 with the clip ratio c in `CLIP_GRID` that minimises the
  group's squared rounding error (the MSE scale search of the GPTQ reference code's quantizer;
  c = 1 is torchao's RTN scale).
- Layers are rounded in order, block by block of the network: a transformer layer's linears see
  inputs produced by the already-rounded layers before it (the paper's sequential scheme), and the
  output head last, on the final features.

The result is stored on each rounded nn.Linear as `pf_rounding = (q int8 [out, in], s fp32
[out, in/group])` and its weight is replaced by q * s; `quantize_for_executorch` then writes those
exact integers and scales into torchao's quantized tensors, so the exported program runs GPTQ's
weights, not a re-rounding of them.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pocketformer.export.quantize import untie_output_head
from pocketformer.models import layer_hidden
from pocketformer.progress import say

QMIN, QMAX = -8, 7
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass
class GPTQReport:
    group: int
    samples: int
    tokens: int
    damp: float
    act_order: bool = True
    rounded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # mean over linears of the Hessian-weighted output error, RTN vs GPTQ: tr(E H E^T) / tr(W H W^T)
    rtn_error: float = 0.0
    gptq_error: float = 0.0

    def to_dict(self) -> dict:
        return {"method": "gptq", "group": self.group, "samples": self.samples, "tokens": self.tokens,
                "damp": self.damp, "act_order": self.act_order, "rounded": len(self.rounded), "seconds": round(self.seconds, 2),
                "relative_output_error_rtn": round(self.rtn_error, 6),
                "relative_output_error_gptq": round(self.gptq_error, 6)}


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def group_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row scale for one group of columns `w` [rows, group], searched over CLIP_GRID."""
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    best_s = _bf16(amax / 7.5)
    best_e = torch.full_like(amax, float("inf"))
    for c in CLIP_GRID:
        s = _bf16(c * amax / 7.5).clamp_min(1e-8)
        e = ((torch.clamp(torch.round(w / s[:, None]), QMIN, QMAX) * s[:, None] - w) ** 2).sum(1)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
    return best_s


def rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's round-to-nearest on the same grid (scale max|w|/7.5), for comparison."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    s = _bf16(g.abs().amax(-1).clamp_min(1e-8) / 7.5)
    q = torch.clamp(torch.round(g / s[..., None]), QMIN, QMAX)
    return q.reshape(rows, cols).to(torch.int8), s


def gptq_linear(weight: torch.Tensor, hessian: torch.Tensor, group: int, *, damp: float = 0.01,
                block: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of one weight [out, in] given H [in, in]; returns (q int8, scales [out, in/g]).

    act_order: round the columns in order of decreasing H_ii (the inputs with the most energy
    first, the paper's follow-up heuristic), with every group's scale fixed beforehand from the
    unrounded weights ("static groups"), so a group's columns may be visited out of order."""
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if cols % group:
        raise ValueError(f"in_features {cols} is not a multiple of group {group}")
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    S = torch.zeros(rows, cols // group, dtype=torch.float32)
    if act_order:
        for g in range(cols // group):
            S[:, g] = group_scale(W[:, g * group:(g + 1) * group])
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    Q = torch.zeros(rows, cols, dtype=torch.int8)
    block = max(group, block // group * group)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not act_order and col % group == 0:
                # the group's scale from its weights as updated so far (all in this block)
                S[:, col // group] = group_scale(W1[:, i:i + group])
            s = S[:, col // group]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s), QMIN, QMAX)
            Q[:, col] = q.to(torch.int8)
            err = (w - q * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, S


def dequantize(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    return (q.to(torch.float32).reshape(q.shape[0], -1, group) * s[..., None]).reshape(q.shape)


def _output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    e = (wq - w).to(torch.float64)
    w = w.to(torch.float64)
    H = H.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", e, H, e) / torch.einsum("oi,ij,oj->", w, H, w).clamp_min(1e-30))


class _Hessians:
    """Accumulates H = 2/n sum x x^T for a set of linears through forward pre-hooks."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.h = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                  for n, m in linears.items()}
        self.n = {n: 0 for n in linears}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            self.h[name] += x.T @ x
            self.n[name] += x.shape[0]
        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: 2.0 * H / max(self.n[n], 1) for n, H in self.h.items()}


def _round_set(linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor], group: int,
               damp: float, act_order: bool, report: GPTQReport) -> None:
    for name, lin in linears.items():
        w = lin.weight.detach().to(torch.float32)
        H = hessians[name]
        g = group or lin.in_features        # 0: one scale per output channel
        q, s = gptq_linear(w, H, g, damp=damp, act_order=act_order)
        wq = dequantize(q, s, g)
        rq, rs = rtn(w, g)
        report.rtn_error += _output_error(w, dequantize(rq, rs, g), H)
        report.gptq_error += _output_error(w, wq, H)
        lin.weight = nn.Parameter(wq.to(lin.weight.dtype), requires_grad=False)
        lin.pf_rounding = (q, s, g)
        report.rounded.append(name)


def gptq_round_model(loaded, batches: list[tuple[torch.Tensor, ...]], group: int, *,
                     damp: float = 0.01, act_order: bool = True, include_head: bool = True,
                     include_layers: bool = True, keep=()):
    """A copy of `loaded` whose transformer-layer linears (and output head) carry GPTQ-rounded
    4-bit weights for `group` (see the module docstring; 0: one scale per output channel), and
    the report. Linears whose width is not a multiple of `group`, and linears outside the layers
    and head, are left to RTN.
    include_layers=False rounds the head alone (the layers only carry the features to it): grid
    rounding (export/grid.py) writes the layers' integers itself. `keep`: names in `loaded.model`
    of linears that stay at 8 bits (export/quantize.py `int8_names`), so they are not rounded; the
    layers after them are calibrated on their unrounded outputs, which 8-bit weights keep to
    within a fraction of a 4-bit step."""
    from pocketformer.compress.probe import LayerProbe

    start = time.perf_counter()
    model = copy.deepcopy(loaded.model).eval()
    adapter = loaded.adapter
    # the head gets its own weight so rounding it does not touch a tied embedding table
    untie_output_head(adapter, model)
    head = adapter.output_head(model)
    work = copy.copy(loaded)
    work.model = model
    probe = LayerProbe(work)
    layers = probe.layers
    keep = set(keep)
    kept = {id(m) for n, m in model.named_modules() if n in keep}
    if len(kept) != len(keep):
        raise ValueError(f"keep names linears the model does not have: {sorted(keep)[:4]}")
    tokens = sum(int(b[0].numel()) for b in batches)
    report = GPTQReport(group=group, samples=sum(int(b[0].shape[0]) for b in batches), tokens=tokens,
                        damp=damp, act_order=act_order)
    with torch.no_grad():
        traces = [probe.trace(b, list(range(len(layers)))) for b in batches]
        hidden = [t.inputs[0] for t in traces]
        for li, layer in enumerate(layers):
            lins = {f"layers.{li}.{n}": m for n, m in layer.named_modules()
                    if isinstance(m, nn.Linear) and (group == 0 or m.in_features % group == 0)
                    and id(m) not in kept} if include_layers else {}
            acc = _Hessians(lins)
            try:
                for t, h in zip(traces, hidden):
                    layer(h, *t.layer_args, **t.layer_kwargs)
            finally:
                hess = acc.close()
            _round_set(lins, hess, group, damp, act_order, report)
            nxt = []
            for t, h in zip(traces, hidden):
                out = layer(h, *t.layer_args, **t.layer_kwargs)
                nxt.append(layer_hidden(out))
            hidden = nxt
            if include_layers:
                say(f"gptq: layer {li + 1}/{len(layers)} ({len(lins)} linears)")
        if include_head and head is not None and (group == 0 or head.in_features % group == 0):
            feats = [probe.features(t, h) for t, h in zip(traces, hidden)]
            x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).to(torch.float64)
            H = 2.0 * (x.T @ x) / x.shape[0]
            _round_set({"head": head}, {"head": H}, group, damp, act_order, report)
    n = max(len(report.rounded), 1)
    report.rtn_error /= n
    report.gptq_error /= n
    report.seconds = time.perf_counter() - start
    say(f"gptq: {len(report.rounded)} linears in {report.seconds:.0f} s; relative output error "
        f"RTN {report.rtn_error:.4g} -> GPTQ {report.gptq_error:.4g}")
    return work, report


def apply_rounding(module: nn.Module) -> int:
    """After torchao's quantize_: overwrite the integers and scales of every quantized linear that
    carries `pf_rounding` with the GPTQ ones. Returns how many were written."""
    written = 0
    for m in module.modules():
        r = getattr(m, "pf_rounding", None)
        if r is None or not isinstance(m, nn.Linear):
            continue
        q, s, group = r
        w = m.weight
        if not hasattr(w, "qdata") or tuple(w.qdata.shape) != tuple(q.shape) \
                or tuple(w.scale.shape) != tuple(s.shape):
            continue
        with torch.no_grad():
            w.qdata.copy_(q.to(w.qdata.dtype))
            w.scale.copy_(s.to(w.scale.dtype))
            w.zero_point.zero_()
        written += 1
    return written
