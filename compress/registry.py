"""Compression methods by name: a config dataclass plus `apply(loaded, config, calib)`.

A new method is one config class and one function registered here; the recipe, the CLI
(`pocketformer compress --method NAME --<field> ...`) and the report pick it up from the registry.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel, count_params
from pocketformer.progress import say
from pocketformer.schema import from_dict


@dataclass
class Calibration:
    """The user's calibration data and how to turn it into model inputs; in a recipe whose later
    steps ask to distil from it (`teacher = "original"`), also the model as it was before the
    first step (`original`, None otherwise)."""
    data: object                # TextData | PairData | SentenceData | ImageData
    seq_len: int = 128
    max_samples: int = 64
    batch_size: int = 8
    seed: int = 0
    original: LoadedModel | None = None

    def inputs(self, loaded: LoadedModel):
        return loaded.adapter.calibration_inputs(
            loaded, self.data, max_samples=self.max_samples, seq_len=self.seq_len,
            batch_size=self.batch_size, seed=self.seed)


ApplyFn = Callable[[LoadedModel, object, "Calibration | None"], dict]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    apply: ApplyFn
    summary: str
    needs_data: bool

    def needs_calibration(self, config) -> bool:
        """Whether this configuration reads calibration data (a config may refine the default)."""
        refine = getattr(config, "needs_calibration", None)
        return refine() if refine is not None else self.needs_data


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, *, summary: str, needs_data: bool = True):
    def deco(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise RuntimeError(f"compression method {name!r} registered twice")
        METHODS[name] = Method(name, config_cls, fn, summary, needs_data)
        return fn
    return deco


def get_method(name: str, *, file: str | None = None, field: str | None = None) -> Method:
    if name not in METHODS:
        raise BadInputError(f"unknown compression method {name!r}; available: "
                            f"{', '.join(sorted(METHODS))}", file=file, field=field)
    return METHODS[name]


def parse_params(method: Method, params: dict, *, file: str | None = None, prefix: str = ""):
    return from_dict(method.config_cls, params, file=file, prefix=prefix)


def run_step(loaded: LoadedModel, method_name: str, config, calib: Calibration | None) -> dict:
    """Apply one step in place and append what it did to `loaded.history`."""
    method = get_method(method_name)
    if method.needs_calibration(config) and calib is None:
        raise BadInputError(f"method {method_name!r} needs calibration data", field="calibration")
    before = count_params(loaded.model)
    start = time.perf_counter()
    say(f"compress: {method_name}")
    details = method.apply(loaded, config, calib) or {}
    record = {
        "method": method_name,
        "params": dataclasses.asdict(config),
        "params_before": before,
        "params_after": count_params(loaded.model),
        "seconds": round(time.perf_counter() - start, 3),
        "details": details,
    }
    loaded.history.append(record)
    return record
