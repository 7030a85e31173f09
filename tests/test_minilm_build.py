"""The main job on the real all-MiniLM-L6-v2: `pocketformer build examples/minilm.toml`, then
every field of its report, the reload, the artifacts' parity on fresh sentences, and the
stage commands (eval, bench, report) on what it wrote."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketformer.fsutil import sha256_file

from conftest import REPO, SHARED, STS_DEV

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "pocketformer")
# Dropping 2 of 6 layers with no recovery keeps STS Spearman within this (relative) tolerance.
STS_TOLERANCE = 0.03


def _untimed_copy(recipe: Path, into: Path) -> Path:
    """The example recipe with its data paths made absolute and its host latency limit raised
    out of reach: the test checks that the budget is evaluated and reported, not how fast this
    shared machine is (a loaded 2-core run measured ONNX Runtime's p50 at 64 ms against the
    example's 60). Every other line, budgets included, is the example's."""
    text = recipe.read_text()
    assert "../../shared/data/" in text, recipe
    text = text.replace("../../shared/data/", f"{SHARED}/")
    text, n = re.subn(r"max_p50_ms = \{ host = [0-9.]+ \}", "max_p50_ms = { host = 1000000 }", text)
    assert n == 1, recipe
    copy = into / recipe.name
    copy.write_text(text)
    return copy


@pytest.fixture(scope="module")
def build_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "minilm"
    recipe = _untimed_copy(REPO / "examples" / "minilm.toml", tmp_path_factory.mktemp("recipe"))
    proc = subprocess.run([CLI, "build", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budgets    PASSED" in proc.stdout
    return out


@pytest.fixture(scope="module")
def report(build_out) -> dict:
    return json.loads((build_out / "report.json").read_text())


def test_report_has_every_field(report, build_out):
    assert report["schema_version"] == 1
    assert report["recipe"]["sha256"] and report["recipe"]["content"]["model"]["source"] == "minilm"
    m = report["model"]
    assert m["before"]["num_layers"] == 6 and m["after"]["num_layers"] == 4
    assert m["before"]["params"] == 22_713_216 and m["after"]["params"] < m["before"]["params"]
    assert {a["format"] for a in report["artifacts"]} == {"onnx", "pte"}
    for a in report["artifacts"]:
        path = build_out / a["path"]
        assert path.stat().st_size == a["size_bytes"] and sha256_file(path) == a["sha256"]
        assert a["parity"]["passed"] and a["parity"]["cosine"] >= 0.9999
        assert a["parity"]["max_abs_diff"] <= 1e-3
    assert {(b["runtime"], b["target"]) for b in report["bench"]} == {
        ("onnxruntime", "host"), ("executorch", "host")}
    for b in report["bench"]:
        lat = b["latency_ms"]
        assert set(lat) >= {"min", "p50", "p90", "p99", "mean", "std", "max"}
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert len(b["latencies_ms"]) == b["runs"] == 30 and b["warmup"] == 5
        assert b["load_ms"] > 0 and b["first_inference_ms"] > 0
        # the process holds at least the weights it runs
        assert b["peak_rss_mb"] > 0.9 * next(a["size_mb"] for a in report["artifacts"]
                                             if a["path"] == b["artifact"])
    pte = next(a for a in report["artifacts"] if a["format"] == "pte")
    details = json.loads((build_out / f"{pte['path']}.json").read_text())["details"]
    # norms and attention in XNNPACK's operators (models/xnnpack_form.py): the 4 kept layers'
    # 8 LayerNorms and the embeddings' one, and no layer cut on portable kernels
    assert details["forward_form"]["norms_by_linear"] == 9
    assert details["delegation"]["partitions"] <= 4
    assert not {"native_layer_norm", "any.dim", "logical_not"} & set(details["delegation"]["portable_ops"])
    names = {b["name"] for b in report["budgets"]}
    assert names == {"parity", "max_size_mb", "max_p50_ms", "max_quality_drop"}
    assert report["passed"] is True and all(b["passed"] for b in report["budgets"])
    assert set(report["timings_s"]) >= {"load", "compress", "export", "bench", "eval_before", "eval_after"}
    md = (build_out / "report.md").read_text()
    for heading in ("## Model", "## Quality", "## Artifacts", "## Benchmarks", "## Budgets"):
        assert heading in md


def test_sts_within_tolerance_of_dense(report):
    q = report["quality"]
    assert q["metric"] == "spearman" and q["samples"] == 750
    assert 0.78 <= q["before"] <= 0.84, "dense all-MiniLM-L6-v2 on the STS-B dev half"
    assert q["relative_drop"] <= STS_TOLERANCE
    assert q["after"] >= q["before"] * (1 - STS_TOLERANCE)


def test_model_reloads_and_artifacts_match_eager_on_new_sentences(build_out):
    from transformers import AutoModel, AutoTokenizer

    from pocketformer.export import open_artifact

    model = AutoModel.from_pretrained(build_out / "model").eval()
    assert model.config.num_hidden_layers == 4
    tok = AutoTokenizer.from_pretrained(build_out / "model")
    enc = tok(["A man is playing a guitar.", "The cat sleeps on the warm windowsill today."],
              padding="max_length", max_length=128, return_tensors="pt")
    with torch.inference_mode():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    onnx_out = open_artifact(build_out / "artifacts" / "model.onnx")(enc["input_ids"], enc["attention_mask"])
    pte = open_artifact(build_out / "artifacts" / "model.pte")
    pte_out = np.concatenate([pte(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1])
                              for i in range(2)])
    for out in (onnx_out, pte_out):
        cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() >= 0.9999


def test_eval_command_reproduces_report(build_out, report, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([CLI, "eval", str(build_out / "model"), "--task", "sts", "--data",
                           f"{STS_DEV}@0.5:1", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    blob = json.loads(out.read_text())
    assert blob["spearman"] == pytest.approx(report["quality"]["after"], abs=1e-6)


def test_bench_and_report_commands(build_out, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([CLI, "bench", str(build_out / "artifacts" / "model.onnx"), "--target",
                           "host", "--runs", "5", "--warmup", "1", "--threads", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["threads"] == 1 and len(result["latencies_ms"]) == 5
    assert result["latency_ms"]["p50"] > 0 and result["peak_rss_mb"] > 0
    (build_out / "report.md").unlink()
    proc = subprocess.run([CLI, "report", str(build_out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (build_out / "report.md").is_file()
    assert "PASSED" in proc.stdout


def test_budget_failure_exits_3_and_names_the_budget(tiny_bert, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
[model]
source = "{tiny_bert}"
[data]
evaluation = "{STS_DEV}@0.9:1"
[[compress.steps]]
method = "drop-layers"
layers = [3]
[export]
formats = ["onnx"]
seq_len = 16
[bench]
runs = 3
warmup = 1
[budgets]
max_size_mb = 0.01
""")
    out = tmp_path / "o"
    proc = subprocess.run([CLI, "build", str(recipe), "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "max_size_mb" in proc.stderr
    blob = json.loads((out / "report.json").read_text())
    assert blob["passed"] is False
    failed = [b for b in blob["budgets"] if not b["passed"]]
    assert [b["name"] for b in failed] == ["max_size_mb"]
    assert subprocess.run([CLI, "report", str(out)], capture_output=True).returncode == 3
