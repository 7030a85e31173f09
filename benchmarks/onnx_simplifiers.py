"""Why onnxslim and not onnxsim: both simplifiers on the same dynamo-exported ONNX graph.

    .venv/bin/pip install onnxsim==0.8.1   # not a pocketformer dependency
    .venv/bin/python benchmarks/onnx_simplifiers.py [MODEL]

Prints node counts, simplifier time, parity against the unsimplified graph and ORT p50.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    import onnx
    import onnxruntime as ort

    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model

    source = sys.argv[1] if len(sys.argv) > 1 else "minilm"
    loaded = load_model(source)
    tmp = Path(tempfile.mkdtemp())
    export_model(loaded, tmp, ExportConfig(formats=["onnx"], simplify=False))
    raw = onnx.load(str(tmp / "model.onnx"))
    with np.load(tmp / "model.onnx.inputs.npz") as z:
        feeds = {k: z[k] for k in z.files}
    candidates = {"none": lambda m: m}
    try:
        import onnxslim
        candidates["onnxslim"] = onnxslim.slim
    except ImportError:
        pass
    try:
        import onnxsim
        candidates["onnxsim"] = lambda m: onnxsim.simplify(m)[0]
    except ImportError:
        print("onnxsim not installed; pip install onnxsim==0.8.1 to compare it")
    reference = None
    print(f"{'simplifier':<10} {'nodes':>6} {'seconds':>8} {'max|diff|':>10} {'ORT p50 ms':>10}")
    for name, fn in candidates.items():
        start = time.perf_counter()
        try:
            model = fn(onnx.load(str(tmp / "model.onnx")))
        except Exception as e:  # report, don't hide, a simplifier that fails
            print(f"{name:<10} failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        seconds = time.perf_counter() - start
        path = tmp / f"{name}.onnx"
        onnx.save(model, str(path))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, feeds)[0]
        reference = out if reference is None else reference
        lat = []
        for i in range(33):
            t = time.perf_counter()
            sess.run(None, feeds)
            if i >= 3:
                lat.append((time.perf_counter() - t) * 1e3)
        print(f"{name:<10} {len(model.graph.node):>6} {seconds:>8.2f} "
              f"{float(np.abs(out - reference).max()):>10.2e} {np.median(lat):>10.2f}")
    del raw
    return 0


if __name__ == "__main__":
    sys.exit(main())
