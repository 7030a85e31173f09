"""The model adapter: the one place that knows where a family keeps its layers, heads, FFN and embeddings.

Compression methods, exporters and evaluators ask an adapter instead of reaching into
`transformers` module paths themselves, so a new family is one new adapter.
"""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from pocketformer.errors import BadInputError
from pocketformer.models import factored

METADATA_FILE = "pocketformer.json"
# Factors of a low-rank recovery (compress/recovery.py LowRank), already merged into the weights:
# "<linear>.A" (r x in) and "<linear>.B" (out x r) with weight = base + B @ A. Export reads them
# to round the base alone (export/grid.py); plain transformers ignores the file.
LOWRANK_FILE = "pocketformer_lowrank.safetensors"


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

    def clone(self) -> "LoadedModel":
        """A deep copy of the model with what feeds it, without the history: a teacher that
        stays as it is while this one changes, or a fresh student."""
        return LoadedModel(self.adapter, copy.deepcopy(self.model), self.tokenizer, self.source,
                           dict(self.extras))


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Shrink `linear` in place to the output features `rows` (real smaller tensors, not masks)."""
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone())
    linear.out_features = len(rows)
    linear.__dict__.pop("pf_lowrank", None)   # low-rank recovery factors of the old shape


def _keep_cols(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())
    linear.in_features = len(cols)
    linear.__dict__.pop("pf_lowrank", None)


def lowrank_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The low-rank recovery factors carried by `model`'s linears, as LOWRANK_FILE stores them."""
    out = {}
    for name, mod in model.named_modules():
        ab = getattr(mod, "pf_lowrank", None)
        if ab is not None and isinstance(mod, nn.Linear):
            out[f"{name}.A"], out[f"{name}.B"] = ab
    return out


def attach_lowrank(model: nn.Module, path: Path) -> int:
    """Put the factors of LOWRANK_FILE in `path` back on the linears they belong to (those whose
    shapes match). Returns how many linears got factors."""
    file = path / LOWRANK_FILE
    if not file.is_file():
        return 0
    from safetensors.torch import load_file

    blob = load_file(str(file))
    n = 0
    for name, mod in model.named_modules():
        a, b = blob.get(f"{name}.A"), blob.get(f"{name}.B")
        if isinstance(mod, nn.Linear) and a is not None and b is not None \
                and a.shape[1] == mod.in_features and b.shape[0] == mod.out_features:
            mod.pf_lowrank = (a, b)
            n += 1
    return n


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name + "."
    return "\0"


def layer_hidden(output) -> torch.Tensor:
    """A layer's hidden-state output, for hooks and direct calls: `transformers` layers return the
    tensor itself or a tuple whose first item it is (the rest attention weights or a cache,
    depending on the family and version)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def count_params(module: nn.Module) -> int:
    # parameters() yields a tied tensor once, which is the count that matters for size.
    return sum(p.numel() for p in module.parameters())


class ModelAdapter:
    """Architecture knowledge for one family of transformers models."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    task: ClassVar[str]              # default eval task: ppl | sts | accuracy
    data_kind: ClassVar[str]         # text | pairs | images
    pre_norm: ClassVar[bool]         # blocks add to the residual stream before normalising
    input_names: ClassVar[tuple[str, ...]]
    output_names: ClassVar[tuple[str, ...]]

    # ---- loading / saving -------------------------------------------------------------------
    def load_dir(self, path: Path, config) -> LoadedModel:
        raise NotImplementedError

    @staticmethod
    def has_per_layer_shapes(path: Path) -> bool:
        """Whether the saved config needs pocketformer's loader (per-layer widths or a factored
        token embedding) rather than plain from_pretrained."""
        config = path / "config.json"
        if not config.is_file():
            return False
        blob = json.loads(config.read_text())
        return "pocketformer_layers" in blob or "pocketformer_embedding" in blob

    def save(self, loaded: LoadedModel, out_dir: Path) -> None:
        """Write a directory that `load_dir` reloads.

        Uniform shapes are written as plain config fields, so plain transformers loads the result.
        Per-layer widths that differ are written as `pocketformer_layers` (a list of
        {num_attention_heads, num_key_value_heads, intermediate_size}) in config.json; such a
        directory needs `pocketformer.models.load_model`, which builds each layer at its size.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        model = loaded.model
        config = model.config
        if getattr(config, "quantization_config", None) is not None:
            # A GGUF-loaded model is dequantized in memory; what we save is plain fp32.
            del config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        shapes = self.layer_shapes(model)
        uniform = self.uniform_config_fields(shapes, config) if shapes else {}
        for key in ("pocketformer_layers", "pocketformer_embedding"):
            if hasattr(config, key):
                delattr(config, key)
        if uniform is None:
            config.pocketformer_layers = shapes
        else:
            for key, value in uniform.items():
                setattr(config, key, value)
        emb = self.embeddings(model)
        entry = factored.describe(emb) if emb is not None else None
        state_dict = None
        if entry is not None:
            config.pocketformer_embedding = entry
            head = self.lm_head(model)
            if head is not None and self.tied_head(model):
                # A tied factored head holds no tensors of its own: save the table once.
                head_prefix = _prefix_of(model, head)
                state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith(head_prefix)}
        model.save_pretrained(out_dir, state_dict=state_dict)
        factors = lowrank_factors(model)
        if factors:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in factors.items()}, str(out_dir / LOWRANK_FILE))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(out_dir)
        meta = {
            "family": self.family,
            "origin": loaded.origin or loaded.source,
            "history": loaded.history,
            "extras": loaded.extras,
            "params": count_params(model),
            "per_layer_shapes": uniform is None,
        }
        (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load_per_layer(self, path: Path, build) -> nn.Module:
        """Build a model whose structure plain transformers cannot express from its config:
        per-layer widths (`pocketformer_layers`) and/or a factored token embedding
        (`pocketformer_embedding`), then load the weights strictly."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        model = build(config)
        shapes = getattr(config, "pocketformer_layers", None)
        if shapes:
            self.resize_to(model, shapes)
        entry = getattr(config, "pocketformer_embedding", None)
        tied = bool(getattr(config, "tie_word_embeddings", False)) and self.lm_head(model) is not None
        if entry:
            module = factored.build(entry)
            self.set_embeddings(model, module)
            if tied:
                self.set_lm_head(model, factored.head_for(module))
        state = {}
        for f in sorted(path.glob("*.safetensors")):
            if f.name != LOWRANK_FILE:
                state.update(load_file(f))
        state = _to_module_names(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        head_keys = {k for k in missing if k.startswith(("lm_head.", "cls."))} if tied else set()
        if set(missing) - head_keys or unexpected:
            raise ValueError(f"weights do not match the recorded shapes: missing "
                             f"{sorted(set(missing) - head_keys)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if tied and not entry:
            model.tie_weights()
        return model.eval()

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
        if head is None or emb is None:
            return False
        if getattr(head, "embedding", None) is emb:      # a factored head reading the same table
            return True
        return isinstance(emb, nn.Embedding) and head.weight is emb.weight

    def set_embeddings(self, model: nn.Module, module: nn.Module) -> None:
        model.set_input_embeddings(module)

    def set_lm_head(self, model: nn.Module, module: nn.Module) -> None:
        model.set_output_embeddings(module)

    def vocabulary(self, loaded: LoadedModel) -> list[str]:
        """Token strings by id (empty strings past the tokenizer's vocabulary)."""
        V = self.embeddings(loaded.model).num_embeddings
        tok = loaded.tokenizer
        n = min(V, len(tok)) if tok is not None else 0
        names = tok.convert_ids_to_tokens(list(range(n))) if n else []
        return [t or "" for t in names] + [""] * (V - n)

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

    # ---- width ---------------------------------------------------------------------------------
    def keep_kv_heads(self, layer: nn.Module, config, keep_kv: Sequence[int]) -> None:
        """Keep the KV heads `keep_kv` with their whole query groups; head_dim is untouched (RoPE).

        Query head h reads KV head h // group_size (transformers' repeat_kv layout), so a group is
        the contiguous query heads [kv * g, (kv + 1) * g). Without GQA a KV head is a head.
        """
        spec = self.attention(layer, config)
        g, hd = spec.group_size, spec.head_dim
        keep_kv = sorted(keep_kv)
        if not keep_kv or keep_kv[0] < 0 or keep_kv[-1] >= spec.num_kv_heads:
            raise ValueError(f"keep_kv must be non-empty indices < {spec.num_kv_heads}")
        kv_rows = torch.cat([torch.arange(k * hd, (k + 1) * hd) for k in keep_kv])
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd)
                            for k in keep_kv for h in range(k * g, (k + 1) * g)])
        _keep_rows(spec.q_proj, q_rows)
        _keep_rows(spec.k_proj, kv_rows)
        _keep_rows(spec.v_proj, kv_rows)
        _keep_cols(spec.o_proj, q_rows)
        self._sync_attention(layer, len(keep_kv) * g, len(keep_kv))

    def _sync_attention(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's own head counters after a resize (family-specific)."""

    def keep_ffn_channels(self, layer: nn.Module, keep: Sequence[int]) -> None:
        spec = self.ffn(layer)
        idx = torch.as_tensor(sorted(keep), dtype=torch.long)
        if len(idx) == 0 or int(idx[-1]) >= spec.width:
            raise ValueError(f"keep must be non-empty channel indices < {spec.width}")
        for lin in spec.inputs:
            _keep_rows(lin, idx)
        _keep_cols(spec.output, idx)

    def layer_shapes(self, model: nn.Module) -> list[dict]:
        """Per-layer widths read off the weights (the source of truth after pruning)."""
        shapes = []
        for layer in self.layers(model):
            a = self.attention(layer, model.config)
            shapes.append({"num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
                           "intermediate_size": self.ffn(layer).width})
        return shapes

    def uniform_config_fields(self, shapes: list[dict], config) -> dict | None:
        """Config fields that make plain transformers build these uniform shapes, or None when
        the family's config cannot express them (then the per-layer loader is needed)."""
        if any(s != shapes[0] for s in shapes):
            return None
        return dict(shapes[0])

    def resize_to(self, model: nn.Module, shapes: list[dict]) -> None:
        """Shrink a freshly built model's layers to `shapes` (weights are loaded afterwards)."""
        for layer, shape in zip(self.layers(model), shapes):
            a = self.attention(layer, model.config)
            if shape["num_key_value_heads"] != a.num_kv_heads or shape["num_attention_heads"] != a.num_heads:
                self.keep_kv_heads(layer, model.config, range(shape["num_key_value_heads"]))
            if shape["intermediate_size"] != self.ffn(layer).width:
                self.keep_ffn_channels(layer, range(shape["intermediate_size"]))

    def positions(self, config, seq_len: int) -> int:
        """Positions one input occupies in the layers: its `seq_len` tokens (an image adapter
        overrides this with its patch count)."""
        return seq_len

    def flops(self, model: nn.Module, seq_len: int) -> int:
        """Multiply-adds x 2 of one forward pass over one sequence of `seq_len` positions, from the
        actual (possibly per-layer) weight shapes: linear layers, attention scores and the
        weighted sum (full T x T, as the exported graphs compute it), and the output head."""
        total = 0
        for layer in self.layers(model):
            a = self.attention(layer, model.config)
            f = self.ffn(layer)
            linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, *f.inputs, f.output]
            total += 2 * seq_len * sum(l.in_features * l.out_features for l in linears)
            total += 2 * 2 * seq_len * seq_len * a.num_heads * a.head_dim
        head = self.output_head(model)
        if head is not None:
            rows = seq_len if self.family == "llama" else 1
            total += 2 * rows * head.in_features * head.out_features
        return total

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

    @contextlib.contextmanager
    def active_layers(self, model: nn.Module, active: Sequence[int]):
        """Run the model through the layers `active` only (no cache), restoring the stack after."""
        full = self.layers(model)
        self._set_layer_list(model, nn.ModuleList([full[i] for i in active]))
        try:
            yield
        finally:
            self._set_layer_list(model, full)

    # ---- what the network outputs, for measuring a change in it ------------------------------
    def output_features(self, loaded: LoadedModel, hidden: torch.Tensor,
                        batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Map the last layer's output [B, T, d] to the features the task head reads, one row per
        scored position ([N, d]): final-normed tokens, pooled sentences or the CLS token."""
        raise NotImplementedError

    def output_head(self, model: nn.Module) -> nn.Linear | None:
        """The linear map from output features to logits (None when the output is an embedding)."""
        return None

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


def _to_module_names(model: nn.Module, state: dict) -> dict:
    """`save_pretrained` writes some families (ViT in transformers 5) under their legacy checkpoint
    names; map those back to the module's own parameter names. Only one-to-one renames are
    handled, which is all the supported families use."""
    own = model.state_dict()
    if all(k in own for k in state):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no renaming on save
        return state
    saved_name = {}
    for key, value in own.items():
        reverted = revert_weight_conversion(model, {key: value})
        if len(reverted) == 1:
            saved_name[next(iter(reverted))] = key
    return {saved_name.get(k, k): v for k, v in state.items()}
