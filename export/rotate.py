"""Orthogonal rotation of a decoder's residual stream before 4-bit rounding.

Why: 8da4w runs every linear on int8 activations quantized per token with one scale, and on
4-bit weights. A few residual channels of a pre-trained LLM carry most of the magnitude
("massive activations"), so one scale per token spends its 256 levels on them and the rest of
the token is rounded coarsely. Rotating the residual stream by a random orthogonal Q spreads
every channel over all of them, so no channel is an outlier any more, and the weights that read
and write the stream are rotated with it, which leaves the network's function unchanged.

The transform (the computational invariance of SliceGPT, Ashkboos et al., ICLR 2024, used for
quantization by QuaRot, Ashkboos et al., NeurIPS 2024, and SpinQuant, Liu et al., 2024):

1. Fold each RMSNorm's gain g into the linears that read its output: W <- W diag(g), g <- 1.
   RMSNorm without a gain commutes with any orthogonal Q: rms(xQ) = rms(x), so
   norm(xQ) = norm(x) Q.
2. Rotate the stream, x' = x Q (row vectors, d x d orthogonal Q):
   - token embedding rows: E <- E Q;
   - linears that read the stream (q, k, v, gate, up, the output head): W <- W Q, since
     x W^T = x' (W Q)^T;
   - linears that write to it (o, down): W <- Q^T W and b <- Q^T b, so that their output is
     rotated too; the residual additions then stay in the rotated basis all the way.
3. Per attention layer, rotate each value head by a head_dim x head_dim orthogonal H (the same
   H for every head): v-projection rows of each KV head W_v <- H^T W_v (and its bias), and the
   o-projection's columns of each query head W_o <- W_o H. Attention mixes positions with
   scalar weights per head, so (P V H) H^T = P V; the o-projection's int8 input loses its
   outlier channels too. RoPE acts on q and k only, which are not touched.

Q is a randomized Hadamard matrix, H diag(s) / sqrt(d) with random signs s, when d is a
power of two times 1, 12 or 144 (Sylvester's construction times Paley's order-12 matrix:
576 = 144 * 4, SmolLM2's width; 64, its head width), else a random orthogonal matrix (QR of a
Gaussian, signs fixed). QuaRot and SpinQuant both report randomized Hadamard ahead of a random
orthogonal matrix for quantization. Seeded: the same model gives the same rotation.

The result is a plain model of the same architecture (norm gains all 1, output head untied
from the embedding), equal to the original up to float rounding; it is never saved, only
quantized. On SmolLM2 the weights are a dequantized Q4_1 GGUF whose blocks line up with group
32: rounding the rotated weights to the nearest grid point loses that alignment (RTN 1.51x ->
1.97x perplexity), so rotation is on by default only together with GPTQ, where it wins
(docs/export.md). Only RMSNorm models can be rotated this way: LayerNorm subtracts the mean,
which does not commute with Q (BERT, ViT are refused).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.export.quantize import untie_output_head
from pocketformer.progress import say


@dataclass
class RotationReport:
    kind: str           # randomized-hadamard | random-orthogonal, for the residual stream
    head_kind: str      # the same for the per-head value rotation
    hidden_size: int
    head_dim: int
    seed: int
    seconds: float = 0.0
    max_logit_diff: float | None = None

    def to_dict(self) -> dict:
        return {"method": "rotation", "residual": self.kind, "value_heads": self.head_kind,
                "hidden_size": self.hidden_size, "head_dim": self.head_dim, "seed": self.seed,
                "seconds": round(self.seconds, 2), "max_logit_diff": self.max_logit_diff}


def _paley12() -> torch.Tensor:
    """Hadamard matrix of order 12 from Paley's construction I with q = 11."""
    q = 11
    squares = {(x * x) % q for x in range(1, q)}

    def chi(a: int) -> int:
        return 0 if a % q == 0 else (1 if a % q in squares else -1)

    s = torch.zeros(12, 12, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = torch.tensor([[chi(j - i) for j in range(q)] for i in range(q)], dtype=torch.float64)
    return torch.eye(12, dtype=torch.float64) + s


def hadamard(n: int) -> torch.Tensor | None:
    """An orthonormal Hadamard matrix of order n (entries +-1/sqrt(n)), or None when n is not a
    power of two times 1, 12 or 144."""
    h = torch.ones(1, 1, dtype=torch.float64)
    m = n
    for _ in range(2):
        if m % 12 == 0:
            h = torch.kron(h, _paley12())
            m //= 12
    while m % 2 == 0:
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
        m //= 2
    if m != 1:
        return None
    return h / math.sqrt(n)


def rotation_matrix(n: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """A seeded n x n orthogonal matrix: randomized Hadamard when one exists, else random."""
    h = hadamard(n)
    if h is not None:
        signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float64)
        return signs[:, None] * h, "randomized-hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random-orthogonal"


def rotatable(loaded) -> str | None:
    """None when `loaded` can be rotated, else the reason it cannot."""
    adapter = loaded.adapter
    if not hasattr(adapter, "norms"):
        return f"{loaded.family} models normalise with LayerNorm, which does not commute with a rotation"
    model = loaded.model
    emb = adapter.embeddings(model)
    if not isinstance(emb, nn.Embedding):
        return f"the token embedding is {type(emb).__name__}, not a table (e.g. SEE-factored)"
    head = adapter.output_head(model)
    if head is not None and not isinstance(head, nn.Linear):
        return f"the output head is {type(head).__name__}, not a linear"
    norms = [n for layer in adapter.layers(model) for n in adapter.norms(layer)] + [adapter.final_norm(model)]
    for n in norms:
        if "RMSNorm" not in type(n).__name__ or getattr(n, "bias", None) is not None:
            return f"{type(n).__name__} is not a gain-only RMSNorm"
    return None


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype).contiguous()


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = _as64(norm.weight)
    for lin in readers:
        _set(lin.weight, _as64(lin.weight) * g[None, :])
    norm.weight.data.fill_(1.0)


def _reads(lin: nn.Linear, q: torch.Tensor) -> None:
    _set(lin.weight, _as64(lin.weight) @ q)


def _writes(lin: nn.Linear, q: torch.Tensor) -> None:
    _set(lin.weight, q.T @ _as64(lin.weight))
    if lin.bias is not None:
        _set(lin.bias, q.T @ _as64(lin.bias))


def _rotate_heads(v: nn.Linear, o: nn.Linear, h: torch.Tensor, head_dim: int) -> None:
    kv = v.out_features // head_dim
    w = _as64(v.weight).view(kv, head_dim, -1)
    _set(v.weight, torch.einsum("ji,hjk->hik", h, w).reshape(kv * head_dim, -1))
    if v.bias is not None:
        _set(v.bias, torch.einsum("ji,hj->hi", h, _as64(v.bias).view(kv, head_dim)).reshape(-1))
    nq = o.in_features // head_dim
    wo = _as64(o.weight).view(o.out_features, nq, head_dim)
    _set(o.weight, torch.einsum("ohj,jk->ohk", wo, h).reshape(o.out_features, nq * head_dim))


@torch.no_grad()
def rotate_model(loaded, *, seed: int = 0, check_inputs=None):
    """A rotated copy of `loaded` (see the module docstring) and its report. `check_inputs`
    (the export signature's example inputs): the largest logit difference against the original
    is recorded."""
    why = rotatable(loaded)
    if why:
        raise BadInputError(f"cannot rotate {loaded.source}: {why}", field="rotation")
    start = time.perf_counter()
    adapter = loaded.adapter
    model = copy.deepcopy(loaded.model).eval()
    untie_output_head(adapter, model)
    emb, head = adapter.embeddings(model), adapter.output_head(model)
    gen = torch.Generator().manual_seed(seed)
    d = emb.weight.shape[1]
    q, kind = rotation_matrix(d, gen)
    layers = list(adapter.layers(model))
    head_kind, head_dim = "", 0
    for layer in layers:
        attn, ffn = adapter.attention(layer, model.config), adapter.ffn(layer)
        attn_norm, ffn_norm = adapter.norms(layer)
        _fold_norm(attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(ffn_norm, list(ffn.inputs))
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, *ffn.inputs):
            _reads(lin, q)
        for lin in (attn.o_proj, ffn.output):
            _writes(lin, q)
        head_dim = attn.head_dim
        h, head_kind = rotation_matrix(head_dim, gen)
        _rotate_heads(attn.v_proj, attn.o_proj, h, head_dim)
    _set(emb.weight, _as64(emb.weight) @ q)
    if head is not None:
        _fold_norm(adapter.final_norm(model), [head])
        _reads(head, q)
    rotated = copy.copy(loaded)
    rotated.model = model
    report = RotationReport(kind, head_kind, d, head_dim, seed)
    if check_inputs is not None:
        a = adapter.export_module(loaded)(*check_inputs)
        b = adapter.export_module(rotated)(*check_inputs)
        report.max_logit_diff = float((a - b).abs().max())
    report.seconds = time.perf_counter() - start
    say(f"rotation: residual {d} ({kind}), value heads {head_dim} ({head_kind}) in "
        f"{report.seconds:.1f} s" + (f"; max logit change {report.max_logit_diff:.2e}"
                                    if report.max_logit_diff is not None else ""))
    return rotated, report


@dataclass
class SmoothingReport:
    alpha: float
    layers: int
    samples: int
    max_input_before: float      # largest |x| entering a down-projection on the calibration data
    max_input_after: float
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": "smoothquant", "where": "ffn down-projection inputs, folded into the up-projection",
                "alpha": self.alpha, "layers": self.layers, "samples": self.samples,
                "max_input_before": round(self.max_input_before, 3),
                "max_input_after": round(self.max_input_after, 3), "seconds": round(self.seconds, 2)}


def _down_input_absmax(loaded, batches) -> list[torch.Tensor]:
    adapter = loaded.adapter
    downs = [adapter.ffn(layer).output for layer in adapter.layers(loaded.model)]
    amax = [torch.zeros(d.in_features) for d in downs]

    def hook(i):
        def fn(mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1])
            amax[i] = torch.maximum(amax[i], x.amax(0).float())
        return fn

    handles = [d.register_forward_pre_hook(hook(i)) for i, d in enumerate(downs)]
    try:
        with torch.no_grad():
            for b in batches:
                loaded.model(*b)
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def smooth_ffn(loaded, batches, *, alpha: float = 0.5):
    """SmoothQuant (Xiao et al., ICML 2023) on the FFN down-projection inputs of a gated
    (SwiGLU) decoder, in place on a copy: per input channel j of the down-projection,
    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) over the calibration tokens, W[:, j] <- W[:, j] s_j,
    and the up-projection's row j divided by s_j. The FFN's hidden value act(gate x) * (up x) is
    linear in the up-projection, so the function is unchanged while the channels that carry the
    massive activations are scaled down and their range moves into the weights. Used before
    ONNX Runtime's int8 dynamic quantization, whose single activation scale per tensor is
    otherwise set by those channels."""
    if loaded.family != "llama":
        raise BadInputError(f"smoothing folds into a gated FFN's up-projection; {loaded.family} has none",
                            field="smoothing")
    start = time.perf_counter()
    out = copy.copy(loaded)
    out.model = copy.deepcopy(loaded.model).eval()
    adapter = out.adapter
    amax = _down_input_absmax(out, batches)
    ffns = [adapter.ffn(layer) for layer in adapter.layers(out.model)]
    after = []
    for ffn, a in zip(ffns, amax):
        up, down = ffn.inputs[-1], ffn.output
        w = _as64(down.weight)
        s = (_as64(a).clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
        _set(down.weight, w * s[None, :])
        _set(up.weight, _as64(up.weight) / s[:, None])
        if up.bias is not None:
            _set(up.bias, _as64(up.bias) / s)
        after.append(float((_as64(a) / s).max()))   # the input of channel j is now x_j / s_j
    report = SmoothingReport(alpha, len(ffns), sum(int(b[0].shape[0]) for b in batches),
                             float(max(a.max() for a in amax)), max(after))
    report.seconds = time.perf_counter() - start
    say(f"smoothing: {len(ffns)} down-projections, largest input {report.max_input_before:.1f} -> "
        f"{report.max_input_after:.1f} (alpha {alpha})")
    return out, report
