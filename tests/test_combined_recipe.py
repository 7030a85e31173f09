"""layered-prune then see in one recipe: steps run in sequence, the report carries the totals,
and the result exports with parity (forward programs; the generation programs of a SEE decoder
are exported in tests/test_see_tiny.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pocketformer.evaluation import relative_drop


CLI = str(Path(sys.executable).parent / "pocketformer")


def test_layered_prune_then_see_in_one_recipe(tiny_llama_2l, small_text, tmp_path):
    recipe = tmp_path / "combined.toml"
    recipe.write_text(f"""
[model]
source = "{tiny_llama_2l}"
[data]
calibration = "{small_text}@0:0.5"
evaluation = "{small_text}@0.5:1"
task = "ppl"
seq_len = 32
eval_seq_len = 32
calibration_samples = 16
[[compress.steps]]
method = "layered-prune"
remove_layers = 1
recovery = "none"
[[compress.steps]]
method = "see"
ratio = 4
reconstruct_steps = 100
hidden_minutes = 0.02
distill_minutes = 0.02
teacher = "original"
[export]
formats = ["onnx", "pte"]
seq_len = 16
generation = false
[bench]
runs = 3
warmup = 1
""")
    out = tmp_path / "o"
    proc = subprocess.run([CLI, "build", str(recipe), "--out", str(out)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    steps = r["compress"]["steps"]
    assert [s["method"] for s in steps] == ["layered-prune", "see"]
    assert steps[0]["params_after"] == steps[1]["params_before"]        # in sequence
    assert steps[1]["details"]["teacher"] == "original"     # SEE distilled from the unpruned model
    before, after = r["model"]["before"], r["model"]["after"]
    assert after["num_layers"] == before["num_layers"] - 1
    assert after["params"] == steps[1]["params_after"]
    assert after["embedding_params"] * 4 <= before["embedding_params"] * 1.01
    assert after["non_embedding_params"] < before["non_embedding_params"]
    assert {a["runtime"] for a in r["artifacts"]} == {"onnxruntime", "executorch"}
    assert all(a["parity"]["passed"] for a in r["artifacts"])
    # each step is scored on the held-out split: the first after layer removal, the last the final
    first, last = steps[0]["quality_after"], steps[1]["quality_after"]
    assert last["value"] == r["quality"]["after"]
    assert last["relative_drop"] == r["quality"]["relative_drop"]
    assert first["value"] not in (r["quality"]["before"], r["quality"]["after"])
    assert first["relative_drop"] == relative_drop(r["quality"]["before"], first["value"], False)
    assert r["timings_s"]["eval_steps"] > 0
    md = (out / "report.md").read_text()
    assert "removed layers" in md and "tied head" in md
    assert "perplexity after (drop)" in md
