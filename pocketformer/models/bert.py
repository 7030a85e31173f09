"""BERT-style encoders (BERT, all-MiniLM-L6-v2) as sentence-embedding models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from pocketformer.models.base import AttentionSpec, FFNSpec, LoadedModel, ModelAdapter

# sentence-transformers files that describe pooling; copied so a saved model stays a
# SentenceTransformer model too.
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
             "1_Pooling")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2.0, dim=-1) if normalize else pooled


class SentenceEmbedding(nn.Module):
    """(input_ids, attention_mask) [B, T] -> sentence embedding [B, d]: masked mean pooling,
    then L2 normalisation when the model was trained with it (all-MiniLM-L6-v2 is)."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.normalize)


class BertAdapter(ModelAdapter):
    family = "bert"
    model_types = ("bert",)
    task = "sts"
    data_kind = "pairs"
    pre_norm = False  # residual add before any normalisation (lsq recovery relies on it)
    input_names = ("input_ids", "attention_mask")
    output_names = ("sentence_embedding",)
    default_seq_len = 128

    def load_dir(self, path: Path, config) -> LoadedModel:
        from transformers import AutoModel, AutoTokenizer

        if self.has_per_layer_shapes(path):
            model = self.load_per_layer(path, AutoModel.from_config)
        else:
            model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        extras = {"normalize": False, "max_seq_length": 256, "source_dir": str(path)}
        modules = path / "modules.json"
        if modules.is_file():
            kinds = [m.get("type", "") for m in json.loads(modules.read_text())]
            extras["normalize"] = any(k.endswith("Normalize") for k in kinds)
        st_config = path / "sentence_bert_config.json"
        if st_config.is_file():
            extras["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length", 256)
        meta = path / "pocketformer.json"
        if meta.is_file():
            extras.update(json.loads(meta.read_text()).get("extras", {}))
            extras["source_dir"] = str(path)
        return LoadedModel(self, model, tokenizer, str(path), extras)

    def save(self, loaded, out_dir):
        super().save(loaded, out_dir)
        src = Path(loaded.extras.get("source_dir", ""))
        for name in _ST_FILES:
            if (src / name).is_dir():
                shutil.copytree(src / name, out_dir / name, dirs_exist_ok=True)
            elif (src / name).is_file():
                shutil.copy2(src / name, out_dir / name)

    def layers(self, model):
        return model.encoder.layer

    def _set_layer_list(self, model, layers):
        model.encoder.layer = layers

    def attention(self, layer, config) -> AttentionSpec:
        sa = layer.attention.self
        head_dim = sa.attention_head_size
        heads = sa.query.out_features // head_dim
        return AttentionSpec(sa.query, sa.key, sa.value, layer.attention.output.dense,
                             num_heads=heads, num_kv_heads=heads, head_dim=head_dim)

    def _sync_attention(self, layer, num_heads, num_kv_heads):
        sa = layer.attention.self
        sa.num_attention_heads = num_heads
        sa.all_head_size = num_heads * sa.attention_head_size

    def uniform_config_fields(self, shapes, config):
        # BERT derives the head size from hidden_size / num_attention_heads, so a uniform head
        # count other than the original cannot be expressed in its config.
        fields = super().uniform_config_fields(shapes, config)
        if fields is None or fields["num_attention_heads"] != config.num_attention_heads:
            return None
        return {"intermediate_size": fields["intermediate_size"]}

    def ffn(self, layer) -> FFNSpec:
        return FFNSpec([layer.intermediate.dense], layer.output.dense)

    def embeddings(self, model):
        return model.embeddings.word_embeddings

    def output_features(self, loaded, hidden, batch):
        return pool(hidden, batch[1], bool(loaded.extras.get("normalize")))

    def export_module(self, loaded):
        return SentenceEmbedding(loaded.model, bool(loaded.extras.get("normalize"))).eval()

    def example_inputs(self, loaded, batch=1, seq_len=None):
        seq_len = seq_len or self.default_seq_len
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, loaded.model.config.vocab_size, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        # A padded tail in the example keeps the mask path honest in parity checks.
        if seq_len > 8:
            mask[:, -seq_len // 4:] = 0
        return ids, mask

    def dynamic_axes(self):
        return {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    def encode_batches(self, loaded, sentences: list[str], *, batch_size: int,
                       max_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        max_len = max_len or int(loaded.extras.get("max_seq_length", 256))
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = loaded.tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                                   max_length=max_len, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    def calibration_inputs(self, loaded, data, *, max_samples, seq_len, batch_size=8, seed=0):
        sentences = data.sentences()
        if len(sentences) > max_samples:   # a seeded random sample, in file order
            pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
            sentences = [sentences[i] for i in sorted(pick[:max_samples].tolist())]
        return self.encode_batches(loaded, sentences, batch_size=batch_size, max_len=seq_len)
