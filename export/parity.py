"""Numerical parity of an exported artifact against eager PyTorch on fixed inputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Parity:
    max_abs_diff: float
    cosine: float
    min_cosine: float
    max_abs_limit: float

    @property
    def passed(self) -> bool:
        return self.cosine >= self.min_cosine and self.max_abs_diff <= self.max_abs_limit

    def to_dict(self) -> dict:
        d = {**asdict(self), "passed": self.passed}
        if d["max_abs_limit"] == float("inf"):
            d["max_abs_limit"] = None  # not gated (quantized artifacts); JSON has no infinity
        return d


def compare(reference, candidate, *, min_cosine: float, max_abs: float) -> Parity:
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != out.shape:
        return Parity(float("inf"), 0.0, min_cosine, max_abs)
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cos = float(ref @ out / denom) if denom > 0 else float(np.array_equal(ref, out))
    return Parity(float(np.max(np.abs(ref - out))) if ref.size else 0.0, cos, min_cosine, max_abs)
