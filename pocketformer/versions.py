"""Versions of the tool and the runtimes it drives, recorded in every report and artifact."""
from __future__ import annotations

from importlib import metadata

PACKAGES = ("pocketformer", "torch", "transformers", "executorch", "onnx", "onnxruntime",
            "onnxscript", "onnxslim")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
