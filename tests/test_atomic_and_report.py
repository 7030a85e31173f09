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


def _build(out, *, size, p50s, quality):
    r = Report(model={"source": "m", "before": {"params": 100}, "after": {"params": 80}},
               quality={"task": "sts", "metric": "spearman", "before": 0.8, "after": quality,
                        "relative_drop": 0.0, "data": "d", "samples": 10},
               artifacts=[{"path": "artifacts/model.onnx", "size_mb": size}],
               bench=[{"artifact": "artifacts/model.onnx", "runner": "native", "target": "host",
                       "latency_ms": summarize(p50s), "latencies_ms": p50s, "peak_rss_mb": 50.0,
                       "instructions_per_inference": None}])
    fsutil.write_json(out / "report.json", r.to_dict())
    return out


def test_comparison_report_ratios_and_html(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    from pocketformer.cli import main

    (tmp_path / "dense").mkdir()
    (tmp_path / "small").mkdir()
    dense = _build(tmp_path / "dense", size=80.0, p50s=[10.0, 10.0, 10.0], quality=0.82)
    small = _build(tmp_path / "small", size=20.0, p50s=[4.0, 5.0, 6.0], quality=0.80)
    html = tmp_path / "cmp.html"
    assert main(["report", str(dense), str(small), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "small/model.onnx [native, host]: 20.0 MB (0.250x)" in out and "(0.500x)" in out
    page = html.read_text()
    svgs = page.split("<svg")[1:]
    assert len(svgs) == 3       # latency distribution, quality vs latency, quality vs size
    for s in svgs:              # each chart is well-formed SVG
        ET.fromstring("<svg" + s.split("</svg>")[0] + "</svg>")
    assert page.count("<circle") >= 6 + 2 + 2
