"""Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2/3): RMSNorm, RoPE, GQA, SwiGLU FFN."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.models.base import AttentionSpec, FFNSpec, LoadedModel, ModelAdapter


class CausalLMLogits(nn.Module):
    """input_ids [B, T] -> logits [B, T, V], without a KV cache (the prefill graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    task = "ppl"
    data_kind = "text"
    pre_norm = True  # residual add before any normalisation (lsq recovery relies on it)
    input_names = ("input_ids",)
    output_names = ("logits",)
    default_seq_len = 128

    def load_dir(self, path: Path, config) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.has_per_layer_shapes(path):
            model = self.load_per_layer(path, AutoModelForCausalLM.from_config)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return LoadedModel(self, model, tokenizer, str(path))

    def load_gguf(self, file: Path) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, OSError, KeyError) as e:
            raise BadInputError(f"cannot load GGUF model: {e}", file=str(file)) from e
        if model.config.model_type not in self.model_types:
            raise BadInputError(f"GGUF architecture {model.config.model_type!r} is not a "
                                f"supported decoder ({', '.join(self.model_types)})", file=str(file))
        return LoadedModel(self, model, tokenizer, str(file))

    def layers(self, model):
        return model.model.layers

    def _set_layer_list(self, model, layers):
        model.model.layers = layers

    def attention(self, layer, config) -> AttentionSpec:
        sa = layer.self_attn
        head_dim = getattr(sa, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return AttentionSpec(sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj,
                             num_heads=sa.q_proj.out_features // head_dim,
                             num_kv_heads=sa.k_proj.out_features // head_dim,
                             head_dim=head_dim)

    def _sync_attention(self, layer, num_heads, num_kv_heads):
        # Forward infers head counts from the projection sizes; the group size is unchanged
        # because whole groups are removed.
        layer.self_attn.num_key_value_groups = num_heads // num_kv_heads

    def ffn(self, layer) -> FFNSpec:
        mlp = layer.mlp
        return FFNSpec([mlp.gate_proj, mlp.up_proj], mlp.down_proj)

    def norms(self, layer):
        """The RMSNorms in front of attention and the FFN (export/rotate.py folds their gains)."""
        return layer.input_layernorm, layer.post_attention_layernorm

    def final_norm(self, model):
        return model.model.norm

    def embeddings(self, model):
        return model.model.embed_tokens

    def lm_head(self, model):
        return model.lm_head

    def output_features(self, loaded, hidden, batch):
        return loaded.model.model.norm(hidden).reshape(-1, hidden.shape[-1])

    def output_head(self, model):
        return model.lm_head

    def export_module(self, loaded: LoadedModel) -> nn.Module:
        return CausalLMLogits(loaded.model).eval()

    def example_inputs(self, loaded, batch=1, seq_len=None):
        seq_len = seq_len or self.default_seq_len
        g = torch.Generator().manual_seed(0)
        vocab = loaded.model.config.vocab_size
        return (torch.randint(0, vocab, (batch, seq_len), generator=g),)

    def dynamic_axes(self):
        return {"input_ids": {0: "batch", 1: "seq"}}

    def token_ids(self, loaded: LoadedModel, text: str) -> torch.Tensor:
        return torch.tensor(loaded.tokenizer(text, add_special_tokens=False).input_ids,
                            dtype=torch.long)

    def calibration_inputs(self, loaded, data, *, max_samples, seq_len, batch_size=8, seed=0):
        """`max_samples` windows of `seq_len` tokens drawn at random (seeded, without replacement)
        from all non-overlapping windows of the text, so a small sample still spans the data."""
        ids = self.token_ids(loaded, data.text)
        available = len(ids) // seq_len
        if available < 1:
            raise BadInputError(f"needs at least {seq_len} tokens, the text has {len(ids)}",
                                file=data.source)
        n = min(max_samples, available)
        pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
        windows = ids[: available * seq_len].view(available, seq_len)[pick.sort().values]
        return [(windows[i:i + batch_size],) for i in range(0, n, batch_size)]
