"""Export on the real pre-trained models: MiniLM int8 ONNX keeps STS, measured through the
shipped file's own runtime. (SmolLM2's ONNX generation graph decoding the same greedy tokens as
eager: tests/test_smollm2.py, on the pruned model; MiniLM 8da4w: tests/test_gptq.py.)
SmolLM2 8da4w/int8 sizes and perplexities are measured by benchmarks/export_table.py
(docs/export.md): one more SmolLM2 program export would cost the suite minutes."""
from __future__ import annotations

from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, artifact_forward, evaluate
from pocketformer.export import ExportConfig, export_model
from pocketformer.models import load_model

from conftest import STS_DEV


# MiniLM's 8da4w .pte (GPTQ-rounded, the default with calibration data) is tested in test_gptq.py
def test_minilm_int8_onnx_keeps_sts(tmp_path):
    loaded = load_model("minilm")
    (rec,) = export_model(loaded, tmp_path, ExportConfig(formats=["onnx"], quantize="int8",
                                                         etrecord=False))
    assert rec.parity["passed"] and rec.parity["cosine_vs_fp32"] >= 0.99
    data = load_for("pairs", DataSpec.parse(f"{STS_DEV}@0:0.3"))
    eager = evaluate(loaded, "sts", data).value
    fn, o, _ = artifact_forward(tmp_path / rec.path, EvalOptions())
    shipped = evaluate(loaded, "sts", data, fn=fn, opts=o).value
    assert eager - shipped <= 0.01, (eager, shipped)
