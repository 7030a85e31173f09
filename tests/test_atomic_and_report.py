"""Atomic writes (nothing half-written survives a failure) and the budget gate's logic."""
from __future__ import annotations

import pytest

from pocketformer import fsutil
from pocketformer.report import Budgets, Report, apply_budgets, render_markdown
from pocketformer.runtime_bench.stats import summarize


def test_atomic_file_and_dir_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "model.pte"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    fsutil.write_bytes(target, b"whole")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("exporter died")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["model.pte"]
    d = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with fsutil.atomic_dir(d) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError
    assert not d.exists() and [p.name for p in tmp_path.iterdir()] == ["model.pte"]
    with fsutil.atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (d / "config.json").read_text() == "{}"


def _report(size_mb=50.0, p50=20.0, before=0.80, after=0.78, cosine=1.0) -> Report:
    r = Report(model={"source": "m"})
    r.artifacts = [{"path": "artifacts/model.onnx", "size_mb": size_mb, "runtime": "onnxruntime",
                    "quantization": "fp32", "sha256": "0" * 64, "export_seconds": 1.0,
                    "parity": {"cosine": cosine, "max_abs_diff": 1e-7, "min_cosine": 0.9999,
                               "max_abs_limit": 1e-3, "passed": cosine >= 0.9999}}]
    r.bench = [{"artifact": "artifacts/model.onnx", "runtime": "onnxruntime", "runner": "python",
                "target": "host", "threads": 2, "load_ms": 1.0, "first_inference_ms": 1.0,
                "warmup": 1, "runs": 3, "peak_rss_mb": 100.0, "device": {},
                "latency_ms": {"min": p50, "p50": p50, "p90": p50, "p99": p50, "mean": p50,
                               "std": 0.0, "max": p50}}]
    r.quality = {"task": "sts", "metric": "spearman", "before": before, "after": after,
                 "relative_drop": (before - after) / before, "samples": 10, "data": "x"}
    return r


def test_budget_gate():
    budgets = Budgets(max_size_mb=60, max_p50_ms={"host": 25}, max_quality_drop=0.03)
    r = _report()
    apply_budgets(r, budgets)
    assert r.passed is True and len(r.budgets) == 4
    for kwargs, name in (({"size_mb": 61}, "max_size_mb"), ({"p50": 26}, "max_p50_ms"),
                         ({"after": 0.7}, "max_quality_drop"), ({"cosine": 0.99}, "parity")):
        r = _report(**kwargs)
        apply_budgets(r, budgets)
        assert r.passed is False and [c["name"] for c in r.failed_checks()] == [name]
    r = _report()
    apply_budgets(r, Budgets(max_p50_ms={"qemu:cortex-a76": 5}))
    assert r.passed is False and "no benchmark ran" in r.failed_checks()[0]["detail"]
    assert "FAIL" in render_markdown(r)
    assert Report.from_dict(r.to_dict()).budgets == r.budgets


def test_latency_summary():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["min"] == 1.0 and s["max"] == 100.0 and s["p50"] == 3.0
    assert s["trimmed_mean"] == pytest.approx(22.0)   # 10% of 5 rounds to no cut
    s = summarize([float(i) for i in range(1, 21)])
    assert s["trimmed_mean"] == pytest.approx(10.5) and s["p90"] == pytest.approx(18.1)
