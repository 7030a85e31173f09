"""ONNX (dynamo exporter + onnxslim, run with ONNX Runtime) and ExecuTorch .pte (XNNPACK)."""
from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pocketformer import fsutil
from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.models import LoadedModel
from pocketformer.progress import say
from pocketformer.versions import versions
from pocketformer.export.parity import compare
from pocketformer.export.runtimes import open_artifact

FORMATS = ("onnx", "pte")
QUANTIZATIONS = ("fp32",)


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    quantize: str = "fp32"
    batch: int = 1                 # example batch for the .pte (static) and parity inputs
    seq_len: int | None = None     # example/static sequence length; adapter default if unset
    simplify: bool = True          # onnxslim pass over the ONNX graph
    parity_min_cosine: float = 0.9999
    parity_max_abs: float = 1e-3

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise BadInputError(f"expected a non-empty list from {', '.join(FORMATS)}, got "
                                f"{self.formats}", field="formats")
        if self.quantize not in QUANTIZATIONS:
            raise BadInputError(f"expected one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}",
                                field="quantize")
        if self.batch < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise BadInputError("batch must be >= 1 and seq_len >= 2", field="seq_len")


@dataclass
class ArtifactRecord:
    format: str
    path: str                # relative to the export directory
    runtime: str
    quantization: str
    size_bytes: int
    sha256: str
    export_seconds: float
    inputs: list[dict]
    outputs: list[str]
    parity: dict
    details: dict = field(default_factory=dict)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    def to_dict(self) -> dict:
        return {**asdict(self), "size_mb": round(self.size_mb, 3)}


def _input_specs(names, tensors) -> list[dict]:
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, tensors)]


def _eager(module, inputs) -> np.ndarray:
    with torch.inference_mode():
        return module(*inputs).numpy()


def export_onnx(loaded: LoadedModel, module, inputs, path: Path, cfg: ExportConfig) -> dict:
    import onnx

    adapter = loaded.adapter
    dims: dict[str, torch.export.Dim] = {}
    dynamic = []
    for name, t in zip(adapter.input_names, inputs):
        axes = {}
        for axis, sym in adapter.dynamic_axes().get(name, {}).items():
            if sym not in dims:
                upper = getattr(loaded.model.config, "max_position_embeddings", 4096) if sym == "seq" else 1024
                dims[sym] = torch.export.Dim(sym, min=2 if sym == "seq" else 1, max=upper)
            axes[axis] = dims[sym]
        dynamic.append(axes or None)
    # The exporter logs one warning per torchvision op it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, tuple(inputs), None, dynamo=True, input_names=list(adapter.input_names),
                output_names=list(adapter.output_names), dynamic_shapes=tuple(dynamic),
                verbose=False)
        except Exception as e:
            raise RuntimeFailure(f"ONNX export failed: {type(e).__name__}: {e}") from e
    proto = program.model_proto
    nodes_before = len(proto.graph.node)
    details = {"opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
               "nodes_exported": nodes_before,
               "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in adapter.dynamic_axes().items()}}
    if cfg.simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
        details["simplifier"] = "onnxslim"
    details["nodes"] = len(proto.graph.node)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise RuntimeFailure(f"exported ONNX graph is invalid: {e}") from e
    with fsutil.atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return details


def export_pte(loaded: LoadedModel, module, inputs, path: Path, cfg: ExportConfig) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(module, tuple(inputs), strict=False)
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            info = get_delegation_info(edge.exported_program().graph_module)
            program = edge.to_executorch()
        except Exception as e:
            raise RuntimeFailure(f"ExecuTorch export failed: {type(e).__name__}: {e}") from e
    fsutil.write_bytes(path, program.buffer)
    total = info.num_delegated_nodes + info.num_non_delegated_nodes
    return {
        "backend": "xnnpack",
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "delegated_share": round(info.num_delegated_nodes / total, 4) if total else None,
        "non_delegated_ops": sorted({op for op, b in info.delegation_by_operator.items()
                                     if b.non_delegated > 0}),
    }


EXPORTERS = {"onnx": (export_onnx, "onnxruntime"), "pte": (export_pte, "executorch")}


def export_model(loaded: LoadedModel, out_dir: str | Path, cfg: ExportConfig | None = None,
                 *, name: str = "model") -> list[ArtifactRecord]:
    """Export to each format, check parity against eager, and write `<name>.<fmt>` plus a
    sidecar `<name>.<fmt>.json` (inputs, parity, versions) and `<name>.<fmt>.inputs.npz`."""
    cfg = cfg or ExportConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = loaded.adapter.export_module(loaded)
    records = []
    for fmt in cfg.formats:
        exporter, runtime = EXPORTERS[fmt]
        inputs = loaded.adapter.example_inputs(loaded, batch=cfg.batch, seq_len=cfg.seq_len)
        checks = [inputs]
        if fmt == "onnx" and cfg.batch == 1:
            # Dynamic axes are traced with batch 2 so the exporter cannot specialise them to 1;
            # parity is then checked at both batch sizes.
            checks.append(loaded.adapter.example_inputs(loaded, batch=2, seq_len=cfg.seq_len))
        path = out_dir / f"{name}.{fmt}"
        say(f"export: {fmt} -> {path}")
        start = time.perf_counter()
        details = exporter(loaded, module, checks[-1], path, cfg)
        seconds = time.perf_counter() - start
        runner = open_artifact(path)
        parity = min((compare(_eager(module, x), runner(*x), min_cosine=cfg.parity_min_cosine,
                              max_abs=cfg.parity_max_abs) for x in checks),
                     key=lambda p: (p.passed, p.cosine, -p.max_abs_diff))
        record = ArtifactRecord(
            format=fmt, path=path.name, runtime=runtime, quantization=cfg.quantize,
            size_bytes=path.stat().st_size, sha256=fsutil.sha256_file(path),
            export_seconds=round(seconds, 3), inputs=_input_specs(loaded.adapter.input_names, inputs),
            outputs=list(loaded.adapter.output_names), parity=parity.to_dict(), details=details)
        with fsutil.atomic_path(out_dir / f"{name}.{fmt}.inputs.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{n: t.numpy() for n, t in zip(loaded.adapter.input_names, inputs)})
        sidecar = {**record.to_dict(), "family": loaded.family, "source": loaded.origin or loaded.source,
                   "versions": versions()}
        fsutil.write_json(out_dir / f"{name}.{fmt}.json", sidecar)
        records.append(record)
    return records


def load_sidecar(artifact: str | Path) -> dict | None:
    side = Path(f"{artifact}.json")
    return json.loads(side.read_text()) if side.is_file() else None
