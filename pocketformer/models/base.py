"""The model adapter: the one place that knows where a family keeps its layers, heads, FFN and embeddings.

Compression methods, exporters and evaluators ask an adapter instead of reaching into
`transformers` module paths themselves, so a new family is one new adapter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from pocketformer.errors import BadInputError

METADATA_FILE = "pocketformer.json"


@dataclass
class AttentionSpec:
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA); 1 for plain multi-head attention."""
        return self.num_heads // self.num_kv_heads


@dataclass
class FFNSpec:
    inputs: list[nn.Linear]  # projections into the FFN width (gate and up for SwiGLU)
    output: nn.Linear        # projection back to the hidden size

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass
class LoadedModel:
    """A model in memory plus what is needed to feed it."""
    adapter: "ModelAdapter"
    model: nn.Module
    tokenizer: Any | None
    source: str
    # Preprocessing facts that are not in the HF config (e.g. image mean/std for ViT).
    extras: dict = field(default_factory=dict)
    # Record of compression steps applied since loading from the original source.
    history: list[dict] = field(default_factory=list)
    # Where the original (uncompressed) model came from, carried across save/reload.
    origin: str | None = None

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def config(self):
        return self.model.config


def count_params(module: nn.Module) -> int:
    # parameters() yields a tied tensor once, which is the count that matters for size.
    return sum(p.numel() for p in module.parameters())


class ModelAdapter:
    """Architecture knowledge for one family of transformers models."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    task: ClassVar[str]              # default eval task: ppl | sts | accuracy
    data_kind: ClassVar[str]         # text | pairs | images
    input_names: ClassVar[tuple[str, ...]]
    output_names: ClassVar[tuple[str, ...]]

    # ---- loading / saving -------------------------------------------------------------------
    def load_dir(self, path: Path, config) -> LoadedModel:
        raise NotImplementedError

    def save(self, loaded: LoadedModel, out_dir: Path) -> None:
        """Write a directory that `load_dir` (and, for uniform shapes, plain transformers) reloads."""
        out_dir.mkdir(parents=True, exist_ok=True)
        config = loaded.model.config
        if getattr(config, "quantization_config", None) is not None:
            # A GGUF-loaded model is dequantized in memory; what we save is plain fp32.
            del config.quantization_config
        if hasattr(loaded.model, "hf_quantizer"):
            loaded.model.hf_quantizer = None
        loaded.model.save_pretrained(out_dir)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(out_dir)
        meta = {
            "family": self.family,
            "origin": loaded.origin or loaded.source,
            "history": loaded.history,
            "extras": loaded.extras,
            "params": count_params(loaded.model),
        }
        (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # ---- structure ----------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def _set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        raise NotImplementedError

    def attention(self, layer: nn.Module, config) -> AttentionSpec:
        raise NotImplementedError

    def ffn(self, layer: nn.Module) -> FFNSpec:
        raise NotImplementedError

    def embeddings(self, model: nn.Module) -> nn.Module | None:
        """The token embedding table (None for families without one, such as ViT)."""
        return None

    def lm_head(self, model: nn.Module) -> nn.Linear | None:
        return None

    def tied_head(self, model: nn.Module) -> bool:
        head, emb = self.lm_head(model), self.embeddings(model)
        return head is not None and emb is not None and head.weight is emb.weight

    def keep_layers(self, model: nn.Module, keep: Sequence[int]) -> None:
        """Keep only the layers at `keep` (in order), updating the config and cache indices."""
        layers = self.layers(model)
        n = len(layers)
        keep = list(keep)
        if not keep:
            raise BadInputError("cannot remove every layer; at least one must remain")
        if sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n:
            raise ValueError(f"keep must be sorted unique indices in [0, {n}), got {keep}")
        new = nn.ModuleList([layers[i] for i in keep])
        self._set_layer_list(model, new)
        config = model.config
        config.num_hidden_layers = len(keep)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == n:
            config.layer_types = [layer_types[i] for i in keep]
        for new_idx, layer in enumerate(new):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_idx

    def describe(self, model: nn.Module) -> dict:
        """Shapes and parameter counts, as the report shows them."""
        layers = self.layers(model)
        emb = self.embeddings(model)
        emb_params = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
        head = self.lm_head(model)
        head_params = 0
        if head is not None and not self.tied_head(model):
            head_params = head.weight.numel()
        total = count_params(model)
        info = {
            "family": self.family,
            "num_layers": len(layers),
            "hidden_size": model.config.hidden_size,
            "params": total,
            "embedding_params": emb_params + head_params,
            "non_embedding_params": total - emb_params - head_params,
            "tied_lm_head": self.tied_head(model) if head is not None else None,
        }
        if len(layers):
            attn = [self.attention(layer, model.config) for layer in layers]
            info["attention_heads"] = [a.num_heads for a in attn]
            info["kv_heads"] = [a.num_kv_heads for a in attn]
            info["head_dim"] = attn[0].head_dim
            info["ffn_widths"] = [self.ffn(layer).width for layer in layers]
        return info

    # ---- inputs, outputs and export -----------------------------------------------------------
    def export_module(self, loaded: LoadedModel) -> nn.Module:
        """An nn.Module with tensor-only inputs/outputs: what exporters trace and runtimes run."""
        raise NotImplementedError

    def example_inputs(self, loaded: LoadedModel, batch: int = 1, seq_len: int | None = None
                       ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input name, the axes that may vary at run time (axis -> symbolic name)."""
        return {}

    def calibration_inputs(self, loaded: LoadedModel, data, *, max_samples: int,
                           seq_len: int, batch_size: int = 8, seed: int = 0
                           ) -> list[tuple[torch.Tensor, ...]]:
        """Turn a dataset (see pocketformer.data) into batches for export_module(...)."""
        raise NotImplementedError
