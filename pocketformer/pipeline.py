"""`pocketformer build`: compress -> export -> bench -> eval -> gate, one recipe, one report.

Output directory layout:
    OUT/model/        the compressed model (Hugging Face format + pocketformer.json)
    OUT/artifacts/    model.onnx, model.pte, each with .json sidecar and .inputs.npz
    OUT/report.json   the versioned report; OUT/report.md the same for people
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path

from pocketformer.compress import Calibration, run_step
from pocketformer.data import load_for
from pocketformer.errors import BadInputError
from pocketformer.evaluation import EvalOptions, evaluate, relative_drop
from pocketformer.export import export_model
from pocketformer.models import load_model, save_model
from pocketformer.progress import say
from pocketformer.recipe import Recipe
from pocketformer.report import Report, apply_budgets
from pocketformer.runtime_bench import bench
from pocketformer.versions import versions


class StageClock:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)


def build(recipe: Recipe, out_dir: str | Path) -> Report:
    out = Path(out_dir)
    clock = StageClock()
    report = Report(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    tool=versions(),
                    recipe={"path": str(recipe.path), "sha256": recipe.sha256, "content": recipe.raw})

    with clock.stage("load"):
        say(f"load: {recipe.model.source}")
        loaded = load_model(recipe.model.source)
    adapter = loaded.adapter
    task = recipe.data.task or adapter.task
    eval_opts = EvalOptions(seq_len=recipe.data.eval_seq_len, max_windows=recipe.data.eval_max_windows)
    with clock.stage("data"):
        calib_data = load_for(adapter.data_kind, recipe.calibration) if recipe.calibration else None
        eval_data = load_for(adapter.data_kind, recipe.evaluation) if recipe.evaluation else None
    report.model = {"source": recipe.model.source, "family": adapter.family,
                    "before": adapter.describe(loaded.model)}

    quality_before = None
    if eval_data is not None:
        with clock.stage("eval_before"):
            say(f"eval: {task} on the uncompressed model")
            quality_before = evaluate(loaded, task, eval_data, opts=eval_opts)

    calib = None
    if calib_data is not None:
        calib = Calibration(calib_data, seq_len=recipe.data.seq_len,
                            max_samples=recipe.data.calibration_samples)
        if any(getattr(s.config, "teacher", None) == "original" for s in recipe.steps[1:]):
            # a later step distils from the model as it was before the first step changed it
            calib.original = loaded.clone()
    records = []
    for i, step in enumerate(recipe.steps):
        with clock.stage("compress"):
            records.append(run_step(loaded, step.method, step.config, calib))
        if eval_data is not None and i < len(recipe.steps) - 1:
            # a recipe of several steps scores the model after each one, so the report shows
            # what each step cost; the last step's figure is the final evaluation below
            with clock.stage("eval_steps"):
                say(f"eval: {task} after step {i + 1} ({step.method})")
                mid = evaluate(loaded, task, eval_data, opts=eval_opts)
            records[-1]["quality_after"] = _step_quality(quality_before, mid)
    if calib is not None:
        calib.original = None        # the unpruned copy is not needed for export and bench
    report.compress = {"steps": loaded.history}
    report.model["after"] = adapter.describe(loaded.model)
    with clock.stage("save"):
        save_model(loaded, out / "model")

    if eval_data is not None:
        with clock.stage("eval_after"):
            say(f"eval: {task} on the compressed model")
            after = evaluate(loaded, task, eval_data, opts=eval_opts)
        final = _step_quality(quality_before, after)
        report.quality = {
            "task": task, "metric": after.metric, "higher_is_better": after.higher_is_better,
            "before": quality_before.value, "after": after.value,
            "relative_drop": final["relative_drop"], "data": after.data, "samples": after.samples,
        }
        if len(records) > 1:
            records[-1]["quality_after"] = final

    with clock.stage("export"):
        export_cfg = recipe.export
        if export_cfg.calibration is None and recipe.calibration is not None \
                and ((export_cfg.quantize == "8da4w" and export_cfg.rounding != "rtn")
                     or (export_cfg.quantize == "int8" and "onnx" in export_cfg.formats)):
            # calibrated 4-bit rounding (8da4w) or outlier smoothing (int8 ONNX) on the recipe's
            # calibration split (never its evaluation)
            export_cfg = dataclasses.replace(export_cfg, calibration=str(recipe.calibration))
        records = export_model(loaded, out / "artifacts", export_cfg, recipe_sha256=recipe.sha256)
    report.artifacts = [dict(r.to_dict(), path=f"artifacts/{r.path}") for r in records]

    with clock.stage("bench"):
        results = bench([out / a["path"] for a in report.artifacts], recipe.bench)
    report.bench = []
    for r in results:
        d = r.to_dict()
        d["artifact"] = str(Path(d["artifact"]).relative_to(out))
        report.bench.append(d)

    report.timings_s = clock.timings
    apply_budgets(report, recipe.budgets)
    report.write(out)
    return report


def _step_quality(before, after) -> dict:
    """The held-out quality after one step of a recipe, and its drop from the uncompressed model."""
    return {"value": after.value, "relative_drop": relative_drop(before.value, after.value,
                                                                 after.higher_is_better),
            "seconds": round(after.seconds, 3)}


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError("output path exists and is not a directory", file=str(out))
