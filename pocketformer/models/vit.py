"""Vision Transformers (transformers' ViTForImageClassification)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pocketformer.models.base import AttentionSpec, FFNSpec, LoadedModel, ModelAdapter


class ClassifierLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class ViTAdapter(ModelAdapter):
    family = "vit"
    model_types = ("vit",)
    task = "accuracy"
    data_kind = "images"
    pre_norm = True  # residual add before any normalisation (lsq recovery relies on it)
    input_names = ("pixel_values",)
    output_names = ("logits",)

    def positions(self, config, seq_len: int) -> int:
        """An image is its patches plus the CLS token, whatever `seq_len` says."""
        return (config.image_size // config.patch_size) ** 2 + 1

    def from_config(self, config, source: str) -> LoadedModel:
        from transformers import ViTForImageClassification

        torch.manual_seed(0)
        model = ViTForImageClassification(config).eval()
        return LoadedModel(self, model, None, source, self._preprocessing(None, config))

    def load_dir(self, path: Path, config) -> LoadedModel:
        from transformers import ViTForImageClassification

        if self.has_per_layer_shapes(path):
            model = self.load_per_layer(path, ViTForImageClassification)
        else:
            model = ViTForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
        return LoadedModel(self, model, None, str(path), self._preprocessing(path, model.config))

    @staticmethod
    def _preprocessing(path: Path | None, config) -> dict:
        pre = {"image_size": config.image_size, "num_channels": config.num_channels,
               "image_mean": [0.5] * config.num_channels, "image_std": [0.5] * config.num_channels}
        for name in ("preprocessor_config.json", "pocketformer.json"):
            f = path / name if path else None
            if f is not None and f.is_file():
                blob = json.loads(f.read_text())
                blob = blob.get("extras", blob)
                for key in ("image_mean", "image_std"):
                    if key in blob:
                        pre[key] = list(blob[key])
        return pre

    def layers(self, model):
        return model.vit.layers

    def _set_layer_list(self, model, layers):
        model.vit.layers = layers

    def attention(self, layer, config) -> AttentionSpec:
        a = layer.attention
        heads = a.q_proj.out_features // a.head_dim
        return AttentionSpec(a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                             num_heads=heads, num_kv_heads=heads, head_dim=a.head_dim)

    def _sync_attention(self, layer, num_heads, num_kv_heads):
        layer.attention.num_attention_heads = num_heads

    def uniform_config_fields(self, shapes, config):
        fields = super().uniform_config_fields(shapes, config)
        if fields is None:
            return None
        # ViTAttention reads config.head_dim when present, so the head count can change.
        return {"num_attention_heads": fields["num_attention_heads"],
                "head_dim": getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
                "intermediate_size": fields["intermediate_size"]}

    def ffn(self, layer) -> FFNSpec:
        return FFNSpec([layer.mlp.fc1], layer.mlp.fc2)

    def output_features(self, loaded, hidden, batch):
        return loaded.model.vit.layernorm(hidden)[:, 0]

    def output_head(self, model):
        return model.classifier

    def export_module(self, loaded):
        return ClassifierLogits(loaded.model).eval()

    def example_inputs(self, loaded, batch=1, seq_len=None):
        c = loaded.model.config
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g),)

    def dynamic_axes(self):
        return {"pixel_values": {0: "batch"}}

    def pixel_values(self, loaded, data) -> torch.Tensor:
        """Raw images (N,H,W[,C], uint8 or float in [0,1]) -> normalised N,C,S,S tensors."""
        x = torch.as_tensor(np.asarray(data.images))
        if data.preprocessed:
            return x.float()
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.float()
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2)
        pre = loaded.extras
        c = pre["num_channels"]
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True).expand(-1, c, -1, -1)
        size = pre["image_size"]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor(pre["image_mean"]).view(1, -1, 1, 1)
        std = torch.tensor(pre["image_std"]).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def calibration_inputs(self, loaded, data, *, max_samples, seq_len, batch_size=8, seed=0):
        x = self.pixel_values(loaded, data)[self._sample(len(data.labels), max_samples, seed)]
        return [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)]

    def calibration_labels(self, data, *, max_samples, batch_size=8, seed=0) -> list[torch.Tensor]:
        """The labels of exactly the images calibration_inputs returns, batched the same way."""
        y = torch.as_tensor(data.labels)[self._sample(len(data.labels), max_samples, seed)]
        return [y[i:i + batch_size] for i in range(0, len(y), batch_size)]

    @staticmethod
    def _sample(n: int, max_samples: int, seed: int) -> torch.Tensor:
        """A seeded random sample of indices, in file order (all of them when n <= max_samples)."""
        if n <= max_samples:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
