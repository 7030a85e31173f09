"""Decoder generation graphs with a static KV cache, and the greedy loops that drive them.

One step function serves prefill and decode: `tokens [1, T]` placed at positions
`input_pos[0] .. input_pos[0] + T - 1` give the logits of those T positions, and the keys and
values of those positions are written into a cache preallocated for `max_len` positions. The
cache is sized per layer from that layer's own projections (KV head count after pruning), so
models whose layers differ in head count or FFN width export the same way as uniform ones.
Attention reads the whole cache under a causal mask row per position, so every shape is
static except T (1 .. max_len), which the exporters keep dynamic.

Logits: by default (`logits="last"`) a step returns the logits of its last position only,
`[1, 1, V]`: generation needs no more, and llama.cpp computes no more for a prompt either
(`llama_batch_get_one` asks for the last token's logits). The output head is a fifth of
SmolLM2's weights and its widest matmul: over a 128-token prompt, computing it for the last
position only made the pruned 8da4w program's prefill 1.18x faster and the SEE decoder's, whose
factored head is slow over many positions, 1.87x (docs/llm_race.md). `logits="all"` keeps
`[1, T, V]` for callers that score every position of a prompt in one call; scoring a text
with a last-only program feeds it one position at a time (`score_positions` in
export/runtimes.py).

    CachedLM      the cache lives in registered buffers, updated in place: the ExecuTorch form
                  (ExecuTorch plans mutable buffers in its memory arena; a Method keeps them
                  between calls). Each buffer is [kv_heads, max_len, head_dim] and the new
                  positions are written with `index_put`, which the exporter's re-inplacing
                  pass turns into an in-place `index_put_` on the planned buffer: no copy of the
                  cache per step (a narrowed `copy_` lowered to a `slice_scatter` of the whole
                  cache plus a whole-cache write-back, per layer, K and V).
    CacheIOLM     the caches are inputs and the updated caches outputs (`present_*`): the ONNX
                  form, where the caller carries the cache from step to step.

The ExecuTorch form computes RMSNorm and RoPE with operators XNNPACK takes on a dynamic token
axis (`XnnpackOps`), so the only cuts in its delegated graph are the cache writes.

RoPE comes from the model's own rotary module (so rope scaling variants follow the config);
Qwen3's per-head q/k norms are applied when the layer has them. Sliding-window attention
(Mistral) is not modelled: such models generate correctly only within the window.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from pocketformer.models.xnnpack_form import is_rms_norm, rms_norm


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def cache_shapes(model, max_len: int) -> list[tuple[int, int, int, int]]:
    hd = _head_dim(model)
    return [(1, layer.self_attn.k_proj.out_features // hd, max_len, hd) for layer in model.model.layers]


def causal_table(max_len: int) -> torch.Tensor:
    """Additive causal mask rows (0 where attended, a large negative elsewhere): a float mask
    keeps SDPA a plain add + softmax, which XNNPACK takes whole (a boolean mask decomposes into
    logical ops that stay on portable kernels)."""
    allowed = torch.ones(max_len, max_len, dtype=torch.bool).tril()
    return torch.zeros(max_len, max_len).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _write_index(cache, pos, new):
    """Write `new` [1, kv_heads, T, head_dim] at positions `pos` [T] of the cache's
    second-to-last axis: a 4-D cache (the ONNX form: ScatterND) or a 3-D one [kv_heads, max_len,
    head_dim] (the ExecuTorch form). `index_put_` itself with values of the cache's rank:
    `cache[..., pos, :] = x` strips x's leading size-1 axes (numpy's rule), and ExecuTorch's
    in-place kernel wants equal ranks (a layer with one KV head would lose its head axis)."""
    indices = [None] * (cache.dim() - 2) + [pos]
    torch.ops.aten.index_put_(cache, indices, new.view(new.shape[-cache.dim():]))


class PlainOps:
    """Normalisation and RoPE as transformers computes them (the ONNX form)."""

    @staticmethod
    def norm(module, x):
        return module(x)

    @staticmethod
    def rope(x, cos, sin):
        from transformers.models.llama.modeling_llama import rotate_half

        return x * cos + rotate_half(x) * sin


class XnnpackOps(nn.Module):
    """The same arithmetic written with operators XNNPACK takes on a graph whose token axis is
    dynamic, so the delegated graph is not cut inside every layer (the 8da4w generation program
    of SmolLM2 lowered as 302 partitions, most of its export time, each one a delegate call):

    - RMSNorm: the mean of squares as a product with a constant 1/d column. XNNPACK's mean only
      averages 4-D tensors over the two inner axes, so `mean(-1)` stayed on portable kernels
      twice per layer. Statistics in fp32 and the gain after casting back, as in transformers.
    - RoPE: `rotate_half` (a slice of each half and a concatenation; XNNPACK's slice does not
      take dynamic shapes) as a product with a constant signed permutation matrix, which is
      exact: every output is one input times +-1.
    """

    def __init__(self, widths, head_dim: int):
        super().__init__()
        for d in sorted(set(widths)):
            self.register_buffer(f"mean_{d}", torch.full((1, d), 1.0 / d), persistent=False)
        h = head_dim // 2
        rot = torch.zeros(head_dim, head_dim)
        rot[torch.arange(h), torch.arange(h) + h] = -1.0      # out[i] = -x[i + h], i < h
        rot[torch.arange(h) + h, torch.arange(h)] = 1.0       # out[i + h] = x[i]
        self.register_buffer("rotate", rot, persistent=False)

    def norm(self, module, x):
        if not is_rms_norm(module):
            return module(x)
        return rms_norm(x, module.weight, module.variance_epsilon, getattr(self, f"mean_{x.shape[-1]}"))

    def rope(self, x, cos, sin):
        return x * cos + nn.functional.linear(x, self.rotate) * sin


LOGITS = ("last", "all")


def _step(model, tokens, input_pos, caches, mask_table, *, ops=PlainOps, last_only: bool = False):
    """Shared body. `caches` is a list of (k, v) tensors updated in place by index assignment
    at the step's positions (`_write_index`). `ops` computes the normalisations and RoPE.
    `last_only`: the final norm and the head see the last position only. Batch 1:
    reshapes name every size but the token axis (XNNPACK reshapes only with one inferred
    dimension and no symbolic one) and attention is a 3-D batched matmul over KV heads."""
    hd = _head_dim(model)
    t = tokens.shape[1]
    pos = input_pos + torch.arange(t, dtype=input_pos.dtype)
    h = model.model.embed_tokens(tokens)
    cos, sin = model.model.rotary_emb(h, pos.unsqueeze(0))
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                     # [1, T, 1, hd], all layers
    mask = mask_table.index_select(0, pos).unsqueeze(0)               # [1, T, max_len]
    masks = {1: mask}   # the mask repeated per query group, once per distinct group count
    scale = hd ** -0.5
    for layer, (kc, vc) in zip(model.model.layers, caches):
        sa = layer.self_attn
        nq, nkv, length = sa.q_proj.out_features // hd, kc.shape[-3], kc.shape[-2]
        x = ops.norm(layer.input_layernorm, h)
        q = sa.q_proj(x).view(1, -1, nq, hd)
        k = sa.k_proj(x).view(1, -1, nkv, hd)
        v = sa.v_proj(x).view(1, -1, nkv, hd).transpose(1, 2)
        if getattr(sa, "q_norm", None) is not None:
            q, k = ops.norm(sa.q_norm, q), ops.norm(sa.k_norm, k)
        q = ops.rope(q, cos, sin)                                     # [1, T, nq, hd]
        k = ops.rope(k, cos, sin).transpose(1, 2)                     # [1, nkv, T, hd]
        _write_index(kc, pos, k)
        _write_index(vc, pos, v)
        groups = nq // nkv
        # GQA without copying the cache: the query heads that share a KV head (heads are ordered
        # kv-major, as transformers' repeat_kv has them) are folded into the query-length axis,
        # row t * groups + g, so each KV head is multiplied once instead of being expanded
        # `groups` times over the whole cache every step (that expand was a third of a SmolLM2
        # decode step). Token-major rows make both reshapes plain merges/splits of one axis.
        qg = q.view(1, -1, nkv, groups * hd).transpose(1, 2).reshape(nkv, -1, hd)  # [kv, T*g, hd]
        if groups not in masks:
            masks[groups] = mask.repeat_interleave(groups, dim=1)
        # written out rather than F.scaled_dot_product_attention, whose decomposition adds
        # boolean "fully masked row" guards that XNNPACK cannot take
        scores = torch.bmm(qg, kc.view(nkv, length, hd).transpose(1, 2)) * scale + masks[groups]
        a = torch.bmm(torch.softmax(scores, dim=-1), vc.view(nkv, length, hd))   # [kv, T*g, hd]
        a = a.view(nkv, -1, groups * hd).transpose(0, 1).reshape(1, -1, nq * hd)
        h = h + sa.o_proj(a)
        h = h + layer.mlp(ops.norm(layer.post_attention_layernorm, h))
    if last_only:
        h = h[:, -1:]
    return model.lm_head(ops.norm(model.model.norm, h))


def _check_logits(logits: str) -> bool:
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    return logits == "last"


class CachedLM(nn.Module):
    """ExecuTorch form: forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, 1, V]
    (the last position; `logits="all"`: [1, T, V])."""

    input_names = ("tokens", "input_pos")
    output_names = ("logits",)

    def __init__(self, model: nn.Module, max_len: int, logits: str = "last"):
        super().__init__()
        self.model = model
        self.max_len = max_len
        self.last_only = _check_logits(logits)
        self.register_buffer("mask_table", causal_table(max_len), persistent=False)
        hd = _head_dim(model)
        self.ops = XnnpackOps([model.config.hidden_size, hd], hd)
        for i, shape in enumerate(cache_shapes(model, max_len)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape[1:]), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape[1:]), persistent=False)

    def caches(self):
        n = len(self.model.model.layers)
        return [(getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")) for i in range(n)]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return _step(self.model, tokens, input_pos, self.caches(), self.mask_table, ops=self.ops,
                     last_only=self.last_only)


class CacheIOLM(nn.Module):
    """ONNX form: forward(tokens, input_pos, past_key_0, past_value_0, ...) ->
    (logits, present_key_0, present_value_0, ...), every cache [1, kv_heads_i, max_len, head_dim];
    logits as CachedLM's."""

    def __init__(self, model: nn.Module, max_len: int, logits: str = "last"):
        super().__init__()
        self.model = model
        self.max_len = max_len
        self.last_only = _check_logits(logits)
        self.register_buffer("mask_table", causal_table(max_len), persistent=False)
        n = len(model.model.layers)
        self.input_names = ("tokens", "input_pos") + tuple(
            f"past_{kind}_{i}" for i in range(n) for kind in ("key", "value"))
        self.output_names = ("logits",) + tuple(
            f"present_{kind}_{i}" for i in range(n) for kind in ("key", "value"))

    def forward(self, tokens, input_pos, *past):
        caches = [(past[2 * i].clone(), past[2 * i + 1].clone()) for i in range(len(past) // 2)]
        logits = _step(self.model, tokens, input_pos, caches, self.mask_table, last_only=self.last_only)
        return (logits,) + tuple(t for kv in caches for t in kv)


def example_step_inputs(model, max_len: int, prompt_len: int = 8, with_caches: bool = False):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    inputs = [tokens, torch.zeros(1, dtype=torch.long)]
    if with_caches:
        for shape in cache_shapes(model, max_len):
            inputs += [torch.zeros(shape), torch.zeros(shape)]
    return tuple(inputs)


# ---- greedy loops ---------------------------------------------------------------------------------

def greedy_eager(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], dict]:
    """Reference: `transformers` generate (its own dynamic KV cache), greedy."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=model.config.eos_token_id or 0)
        seconds = time.perf_counter() - start
    tokens = out[0, len(prompt_ids):].tolist()
    return tokens, {"seconds": seconds}


def greedy_loop(step, prompt_ids: list[int], new_tokens: int, max_len: int) -> tuple[list[int], dict]:
    """Drive a step function `step(tokens [1, T] int64 ndarray, pos int) -> logits [1, T or 1, V]`:
    one prefill call over the prompt, then one call per generated token. Returns the tokens and
    timings (time to first token, decode tokens/s)."""
    if len(prompt_ids) + new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt_ids)}) + new tokens ({new_tokens}) exceed the "
                         f"exported cache length {max_len}")
    start = time.perf_counter()
    logits = step(np.asarray([prompt_ids], dtype=np.int64), 0)
    nxt = int(np.argmax(logits[0, -1]))
    ttft = time.perf_counter() - start
    out = [nxt]
    pos = len(prompt_ids)
    decode_start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = step(np.asarray([[nxt]], dtype=np.int64), pos)
        nxt = int(np.argmax(logits[0, -1]))
        out.append(nxt)
        pos += 1
    decode = time.perf_counter() - decode_start
    return out, {"ttft_s": ttft, "decode_s": decode,
                 "decode_tokens_per_s": (new_tokens - 1) / decode if decode > 0 else None,
                 "prefill_tokens": len(prompt_ids)}
