"""Recipes are validated before any work starts; bad input exits 2 naming file and field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pocketformer.cli import main
from pocketformer.errors import BadInputError
from pocketformer.recipe import load_recipe

from conftest import REPO, STS_DEV


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


GOOD = f"""
[model]
source = "minilm"
[data]
calibration = "{STS_DEV}@0:0.5"
evaluation = "{STS_DEV}@0.5:1"
[[compress.steps]]
method = "drop-layers"
remove_layers = 2
[export]
formats = ["onnx"]
[bench]
runs = 3
[budgets]
max_size_mb = 100
max_p50_ms = {{ host = 100 }}
max_quality_drop = 0.1
"""


def test_example_recipes_validate():
    recipes = sorted((REPO / "examples").glob("*.toml"))
    assert len(recipes) >= 4
    for path in recipes:
        r = load_recipe(path)
        assert r.steps and r.calibration and r.evaluation
        assert r.calibration.path == r.evaluation.path
        # calibration and evaluation slices must not overlap
        assert r.calibration.end <= r.evaluation.start


def test_good_recipe_parses(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.steps[0].method == "drop-layers" and r.steps[0].config.remove_layers == 2
    assert r.budgets.max_p50_ms == {"host": 100.0}
    assert r.evaluation.start == 0.5
    # GPTQ asked for by name calibrates on [data].calibration (never the evaluation split); with
    # no calibration split it is bad input naming the export field
    gptq = GOOD.replace('formats = ["onnx"]', 'formats = ["pte"]\nquantize = "8da4w"\n'
                        'rounding = "gptq"\ngroup_size = 0\nint8_linears = ["query"]')
    r = load_recipe(write(tmp_path, gptq))
    assert r.export.calibration == str(r.calibration) and r.export.int8_linears == ["query"]
    no_cal = gptq.replace(f'calibration = "{STS_DEV}@0:0.5"\n', "").replace(
        "max_quality_drop = 0.1\n", "").replace('method = "drop-layers"', 'method = "drop-layers"\ncriterion = "last"')
    with pytest.raises(BadInputError) as e:
        load_recipe(write(tmp_path, no_cal))
    assert e.value.field == "export.calibration" and "gptq" in str(e.value)


@pytest.mark.parametrize("patch, field, words", [
    (("remove_layers = 2", "remove_layers = \"two\""), "compress.steps[0].remove_layers", "integer"),
    (("method = \"drop-layers\"", "method = \"shrink\""), "compress.steps[0].method", "drop-layers"),
    (("formats = [\"onnx\"]", "formats = [\"tflite\"]"), "export.formats", "onnx"),
    (("runs = 3", "runz = 3"), "bench.runz", "unknown field"),
    (("max_size_mb = 100", "max_size_mb = -1"), "budgets.max_size_mb", "> 0"),
    (("max_p50_ms = { host = 100 }", "max_p50_ms = { \"adb:x\" = 100 }"), "budgets.max_p50_ms.adb:x", "does not measure"),
    (("@0:0.5", "@0.5:0.2"), "data.calibration", "start < end"),
])
def test_invalid_fields_name_file_and_field(tmp_path, patch, field, words):
    path = write(tmp_path, GOOD.replace(*patch))
    with pytest.raises(BadInputError) as e:
        load_recipe(path)
    assert e.value.file == str(path)
    assert e.value.field == field
    assert words in str(e.value)


def test_missing_data_file_and_section(tmp_path):
    with pytest.raises(BadInputError, match="data file not found") as e:
        load_recipe(write(tmp_path, GOOD.replace(str(STS_DEV), "/nonexistent/sts.csv")))
    assert e.value.field == "data.calibration"
    with pytest.raises(BadInputError, match="unknown section"):
        load_recipe(write(tmp_path, GOOD + "\n[extras]\nx = 1\n"))
    with pytest.raises(BadInputError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[model\nsource='x'"))


def test_cli_exit_codes_for_bad_input(tmp_path, capsys):
    assert main(["build", str(tmp_path / "nope.toml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    bad = write(tmp_path, GOOD.replace("remove_layers = 2", "remove_layers = 0"))
    assert main(["build", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "compress.steps[0].remove_layers" in err and str(bad) in err
    assert not (tmp_path / "o").exists(), "nothing may be written when validation fails"


def test_unknown_model_exit_code(tmp_path, capsys):
    assert main(["eval", "no-such-model", "--data", str(STS_DEV)]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "minilm" in err


def test_unsupported_architecture_lists_families(tmp_path, capsys):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "model.safetensors").write_bytes(b"")
    code = main(["compress", "--model", str(d), "--method", "drop-layers", "--layers", "0",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama" in err and "bert" in err and "vit" in err


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "pocketformer"
    out = subprocess.run([str(exe), "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "minilm" in out.stdout and "smollm2" in out.stdout and "drop-layers" in out.stdout
