"""TOML recipes: what to compress, on which data, how to export, where to measure, what budgets.

    [model]            source = "minilm" | HF directory | file.gguf | config.json (ViT)
    [data]             calibration, evaluation (PATH[@START:END]), task, sample/window sizes
    [[compress.steps]] method = "<registered method>", plus that method's parameters
    [export]           formats, quantize, rounding (8da4w: rtn|gptq|grid|auto), rotation (on|off|auto),
                       lm_head, int8_linears (8da4w: linears kept at 8 bits), batch, seq_len, parity tolerances
    [bench]            targets, warmup, runs, threads
    [budgets]          max_size_mb, max_p50_ms = { host = ... }, max_quality_drop

Everything is validated before any work starts; errors name the file and the field.
Relative paths are resolved against the recipe's directory.
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pocketformer.compress import get_method, parse_params
from pocketformer.data import DataSpec
from pocketformer.errors import BadInputError
from pocketformer.evaluation import TASKS
from pocketformer.export import ExportConfig
from pocketformer.report import Budgets
from pocketformer.runtime_bench import BenchConfig
from pocketformer.schema import from_dict

SECTIONS = ("model", "data", "compress", "export", "bench", "budgets")


@dataclass
class ModelSection:
    source: str


@dataclass
class DataSection:
    calibration: str | None = None
    evaluation: str | None = None
    task: str | None = None             # default: the model family's task
    calibration_samples: int = 128      # sequences/sentences/images used by data-driven methods
    seq_len: int = 128                  # calibration sequence length (tokens)
    eval_seq_len: int = 256             # perplexity window
    eval_max_windows: int = 64          # perplexity windows scored

    def validate(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise BadInputError(f"expected one of {', '.join(TASKS)}, got {self.task!r}", field="task")
        for name in ("calibration_samples", "seq_len", "eval_seq_len", "eval_max_windows"):
            if getattr(self, name) < 1:
                raise BadInputError("must be >= 1", field=name)


@dataclass
class Step:
    method: str
    config: object
    raw: dict


@dataclass
class Recipe:
    path: Path
    sha256: str
    raw: dict
    model: ModelSection
    data: DataSection
    steps: list[Step]
    export: ExportConfig
    bench: BenchConfig
    budgets: Budgets
    calibration: DataSpec | None = None
    evaluation: DataSpec | None = None
    extra: dict = field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise BadInputError("recipe not found", file=file)
    blob = path.read_bytes()
    try:
        raw = tomllib.loads(blob.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"not valid TOML: {e}", file=file) from e
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise BadInputError(f"unknown section; expected: {', '.join(SECTIONS)}", file=file,
                            field=f"[{unknown[0]}]")
    if "model" not in raw:
        raise BadInputError("missing section", file=file, field="[model]")
    model = from_dict(ModelSection, raw["model"], file=file, prefix="model")
    data = from_dict(DataSection, raw.get("data", {}), file=file, prefix="data")
    base = path.parent
    specs = {}
    for name in ("calibration", "evaluation"):
        value = getattr(data, name)
        if value is not None:
            spec = DataSpec.parse(value, base_dir=base, field=f"data.{name}", file=file)
            spec.check_exists(field=f"data.{name}", file=file)
            specs[name] = spec

    compress = raw.get("compress", {})
    if not isinstance(compress, dict) or set(compress) - {"steps"}:
        raise BadInputError("expected only [[compress.steps]] tables", file=file, field="compress")
    steps = []
    for i, step in enumerate(compress.get("steps", [])):
        where = f"compress.steps[{i}]"
        if not isinstance(step, dict) or "method" not in step:
            raise BadInputError("each step needs a 'method'", file=file, field=where)
        method = get_method(step["method"], file=file, field=f"{where}.method")
        params = {k: v for k, v in step.items() if k != "method"}
        config = parse_params(method, params, file=file, prefix=where)
        if method.needs_calibration(config) and "calibration" not in specs:
            raise BadInputError(f"method {method.name!r} with these parameters needs "
                                "[data].calibration", file=file, field=where)
        steps.append(Step(method.name, config, dict(step)))

    export_raw = raw.get("export", {})
    if isinstance(export_raw, dict) and export_raw.get("rounding") == "gptq" \
            and "calibration" not in export_raw and "calibration" in specs:
        # GPTQ asked for by name calibrates on the recipe's calibration split (the pipeline fills
        # it in for rounding "auto" too); set here so the export table validates
        export_raw = {**export_raw, "calibration": str(specs["calibration"])}
    export = from_dict(ExportConfig, export_raw, file=file, prefix="export")
    bench = from_dict(BenchConfig, raw.get("bench", {}), file=file, prefix="bench")
    budgets = from_dict(Budgets, raw.get("budgets", {}), file=file, prefix="budgets")
    for target in budgets.max_p50_ms:
        if target not in bench.targets:
            raise BadInputError(f"a latency budget for target {target!r}, which [bench].targets "
                                f"({bench.targets}) does not measure", file=file,
                                field=f"budgets.max_p50_ms.{target}")
    if budgets.max_quality_drop is not None and "evaluation" not in specs:
        raise BadInputError("max_quality_drop needs [data].evaluation", file=file,
                            field="budgets.max_quality_drop")
    return Recipe(path=path, sha256=hashlib.sha256(blob).hexdigest(), raw=raw, model=model,
                  data=data, steps=steps, export=export, bench=bench, budgets=budgets,
                  calibration=specs.get("calibration"), evaluation=specs.get("evaluation"))
