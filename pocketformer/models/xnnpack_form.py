"""Forward programs written in operators XNNPACK delegates whole.

`transformers` computes three things in forms that XNNPACK's partitioner does not take, so
ExecuTorch leaves them on its portable kernels and cuts the delegated graph around each one,
every layer:

- LayerNorm (BERT, ViT): XNNPACK has no layer-norm operator (`native_layer_norm` stayed
  portable, twice per layer).
- RMSNorm (Llama, SmolLM2, Qwen): `mean(-1)` over a 3-D tensor; XNNPACK's mean only averages
  4-D tensors over their two inner axes.
- SDPA with a boolean mask: its decomposition guards fully masked rows with `eq`, `any`,
  `logical_not` and `where`, and the 4-D matmuls of the eager form add `expand` copies.

`xnnpack_form(module)` swaps, for the duration of one `torch.export`, each norm for the same
arithmetic written as products with a constant 1/d column (a linear layer), and the attention
implementation for one that multiplies 3-D batches (`bmm`) under the additive mask `transformers`
builds for its eager attention. The arithmetic is the model's own (fp32 statistics, the same
epsilon and gains); nothing is approximated. all-MiniLM-L6-v2's forward program went from 29
delegated partitions to 4 and SmolLM2's from 154 to 4 (docs/export.md, "Forward programs in
XNNPACK's operators"). The module is restored afterwards: the user's model is not changed.

The generation programs (models/generation.py) write their step by hand and use `rms_norm`
below for the same reason.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

ATTENTION = "pocketformer_xnnpack"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mean_col: torch.Tensor) -> torch.Tensor:
    """y = w * x / rms(x), the mean of squares as a product with `mean_col` = 1/d [1, d];
    statistics in fp32 and the gain after casting back, as `transformers` computes it."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    var = nn.functional.linear(xf * xf, mean_col)
    return weight * (xf * torch.rsqrt(var + eps)).to(dtype)


def is_rms_norm(norm) -> bool:
    """transformers' RMSNorm modules (Llama, Qwen2/3, Mistral, ...): y = w * x / rms(x). Gemma's
    (1 + w) variant keeps its own forward (it names its epsilon `eps`)."""
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")


class RMSNormByLinear(nn.Module):
    """An RMSNorm module's arithmetic with its own gain (the same Parameter, not a copy)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon
        d = norm.weight.shape[-1]
        self.register_buffer("mean_col", torch.full((1, d), 1.0 / d), persistent=False)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.mean_col)


class LayerNormByLinear(nn.Module):
    """nn.LayerNorm over the last axis: mean and (biased) variance as products with 1/d."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        d = norm.normalized_shape[-1]
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.register_buffer("mean_col", torch.full((1, d), 1.0 / d), persistent=False)

    def forward(self, x):
        dtype = x.dtype
        xf = x.to(torch.float32)
        xc = xf - nn.functional.linear(xf, self.mean_col)
        y = xc * torch.rsqrt(nn.functional.linear(xc * xc, self.mean_col) + self.eps)
        y = y.to(dtype)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention over 3-D batches. query [B, H, T, D], key and value [B, Hkv, S, D] with
    H = g Hkv (grouped-query: the g query heads of one KV head are stacked along the rows, so no
    KV head is repeated); `attention_mask` the additive [B, 1, T, S] mask of the eager form, or
    None. Returns [B, T, H, D] as transformers' attention functions do."""
    if module.training and dropout:
        raise RuntimeError("the XNNPACK attention form is for inference (dropout > 0 in training mode)")
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = H // Hkv
    scale = D ** -0.5 if scaling is None else scaling
    q = query.reshape(B * Hkv, g * T, D)
    k = key.reshape(B * Hkv, S, D)
    v = value.reshape(B * Hkv, S, D)
    scores = torch.bmm(q, k.transpose(1, 2)) * scale
    if attention_mask is not None:
        scores = (scores.view(B, H, T, S) + attention_mask[:, :, :, :S]).view(B * Hkv, g * T, S)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v).view(B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, eager_mask)
        _registered = True


@contextlib.contextmanager
def xnnpack_form(module: nn.Module):
    """Within the block, `module`'s LayerNorm and RMSNorm children compute with linear products
    and its transformers attention runs `attention` above; restored on exit. Yields a summary
    (how many norms were swapped, whether the attention was) for the export record."""
    _register()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    configs: dict[int, tuple[object, str]] = {}
    try:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                    new = LayerNormByLinear(child)
                elif is_rms_norm(child):
                    new = RMSNormByLinear(child)
                else:
                    continue
                setattr(parent, name, new)
                swapped.append((parent, name, child))
            cfg = getattr(parent, "config", None)
            impl = getattr(cfg, "_attn_implementation", None)
            if impl is not None and id(cfg) not in configs:
                configs[id(cfg)] = (cfg, impl)
        for cfg, _ in configs.values():
            cfg._attn_implementation = ATTENTION
        yield {"norms_by_linear": len(swapped),
               "attention": "bmm with additive mask" if configs else "model's own"}
    finally:
        for cfg, impl in configs.values():
            cfg._attn_implementation = impl
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
