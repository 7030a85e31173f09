"""ONNX (dynamo exporter + onnxslim, run with ONNX Runtime) and ExecuTorch .pte (XNNPACK)."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pocketformer import fsutil
from pocketformer.errors import BadInputError, BudgetError, RuntimeFailure
from pocketformer.models import LoadedModel
from pocketformer.models.factored import stored_term_weights
from pocketformer.models.xnnpack_form import xnnpack_form
from pocketformer.progress import say
from pocketformer.versions import versions
from pocketformer.export.delegation import delegation_report
from pocketformer.export.parity import compare
from pocketformer.export.quantize import (HEAD_SCHEMES, SCHEMES, QuantPlan, check_plan, quantize_for_executorch,
                                          quantize_onnx_dynamic, xnnpack_int4_per_channel)
from pocketformer.export.runtimes import open_artifact, open_generator
from pocketformer.export.xnnpack_passes import lean_xnnpack_passes

FORMATS = ("onnx", "pte")
QUANTIZATIONS = SCHEMES
ONNX_QUANTIZATIONS = ("fp32", "int8")
ROUNDINGS = ("auto", "rtn", "gptq", "grid")
ROTATIONS = ("auto", "on", "off")
GREEDY_PROMPT = "The history of the city begins in the early years of the"


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    quantize: str = "fp32"              # fp32 | int8 | 8da4w (see export/quantize.py)
    group_size: int | None = None       # 8da4w weight group (0: per output channel); default:
                                          # one dividing every width (export/quantize.py)
    lm_head: str = "int4"               # 8da4w: the output head's weights, int4 (grouped) or int8
    int8_linears: list[str] = field(default_factory=list)   # 8da4w: name patterns of linears kept
                                          # at 8da8w per channel (export/quantize.py name_matches)
    max_unquantized_share: float = 0.0  # gate: share of linear weights a scheme may leave in fp32
    batch: int = 1                 # example batch for the .pte (static) and parity inputs
    seq_len: int | None = None     # example/static sequence length; adapter default if unset
    simplify: bool = True          # onnxslim pass over the ONNX graph
    parity_min_cosine: float = 0.9999
    parity_max_abs: float = 1e-3
    quant_min_cosine: float = 0.99        # quantized artifacts: cosine vs their reference
    min_delegated_flops: float | None = 0.99   # gate: share of FLOPs inside XNNPACK (.pte)
    etrecord: bool = True                 # write <artifact>.etrecord beside each .pte
    xnnpack_form: bool = True             # .pte forward programs: norms and attention traced in
                                          # operators XNNPACK delegates whole (models/xnnpack_form.py)
    ort_format: bool = False              # also write .ort + required_operators.config (ONNX)
    generation: bool | None = None        # decoders: KV-cache generation graph (default: on)
    max_len: int = 256                    # generation: KV cache length (prompt + new tokens)
    gen_logits: str = "last"              # generation: logits of the step's last position (what
                                          # generating needs) or of all its positions ("all")
    greedy_tokens: int = 32               # generation: greedy tokens compared with eager
    rounding: str = "auto"                # 8da4w weights: rtn | gptq | grid | auto (grid for a model
                                          # with low-rank recovery factors, else gptq when calibrated)
    calibration: str | None = None        # data for gptq, PATH[@START:END] (a recipe's [data])
    calibration_samples: int = 64         # gptq: sequences/sentences/images
    calibration_seq_len: int = 256        # gptq: tokens per text sequence
    rotation: str = "auto"                # rotate the residual stream first (export/rotate.py), for
                                          # 8da4w and int8 ONNX: on | off | auto (on for RMSNorm
                                          # decoders when GPTQ runs / int8 ONNX has calibration data)
    smoothing: float | None = 0.5         # int8 ONNX of a gated decoder with calibration data:
                                          # SmoothQuant alpha for the FFN down-projection inputs

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise BadInputError(f"expected a non-empty list from {', '.join(FORMATS)}, got "
                                f"{self.formats}", field="formats")
        if self.quantize not in QUANTIZATIONS:
            raise BadInputError(f"expected one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}",
                                field="quantize")
        if "onnx" in self.formats and self.quantize not in ONNX_QUANTIZATIONS:
            raise BadInputError(f"{self.quantize} is offered for .pte only; ONNX takes "
                                f"{' or '.join(ONNX_QUANTIZATIONS)}", field="quantize")
        if self.batch < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise BadInputError("batch must be >= 1 and seq_len >= 2", field="seq_len")
        if self.group_size is not None and self.group_size < 0:
            raise BadInputError("must be >= 1, or 0 for one scale per output channel", field="group_size")
        if self.group_size == 0 and self.rounding == "grid":
            raise BadInputError("grid rounding keeps the weights' own 4-bit blocks; group 0 (one "
                                "scale per output channel) is for rtn or gptq", field="group_size")
        if self.lm_head not in HEAD_SCHEMES:
            raise BadInputError(f"expected one of {', '.join(HEAD_SCHEMES)}, got {self.lm_head!r}",
                                field="lm_head")
        from pocketformer.models.generation import LOGITS

        if self.gen_logits not in LOGITS:
            raise BadInputError(f"expected one of {', '.join(LOGITS)}, got {self.gen_logits!r}",
                                field="gen_logits")
        if self.int8_linears and self.quantize != "8da4w":
            raise BadInputError(f"keeping linears at 8 bits is for 8da4w programs; --quantize is "
                                f"{self.quantize}", field="int8_linears")
        if any(not isinstance(p, str) or not p.strip() for p in self.int8_linears):
            raise BadInputError(f"expected non-empty name patterns, got {self.int8_linears!r}",
                                field="int8_linears")
        if self.int8_linears and self.rounding == "grid":
            raise BadInputError("grid rounding writes every linear on its 4-bit block grid; keeping "
                                "linears at 8 bits is for rtn or gptq rounding", field="int8_linears")
        if not 0 <= self.max_unquantized_share <= 1:
            raise BadInputError("must be in [0, 1]", field="max_unquantized_share")
        if self.min_delegated_flops is not None and not 0 <= self.min_delegated_flops <= 1:
            raise BadInputError("must be in [0, 1]", field="min_delegated_flops")
        if self.rounding not in ROUNDINGS:
            raise BadInputError(f"expected one of {', '.join(ROUNDINGS)}, got {self.rounding!r}",
                                field="rounding")
        if self.rounding == "gptq" and self.quantize != "8da4w":
            raise BadInputError(f"gptq rounds the 4-bit weights of 8da4w; --quantize is {self.quantize}",
                                field="rounding")
        if self.rounding == "grid" and self.quantize != "8da4w":
            raise BadInputError(f"grid rounding writes the 4-bit weights of 8da4w; --quantize is "
                                f"{self.quantize}", field="rounding")
        if self.rounding == "grid" and self.rotation == "on":
            raise BadInputError("grid rounding keeps the weights' own 4-bit grid, which a rotation "
                                "would mix; use --rotation off or auto", field="rotation")
        if self.rounding == "gptq" and not self.calibration:
            raise BadInputError("gptq needs calibration data (--calibration PATH[@START:END])",
                                field="calibration")
        if self.rotation not in ROTATIONS:
            raise BadInputError(f"expected one of {', '.join(ROTATIONS)}, got {self.rotation!r}",
                                field="rotation")
        if self.rotation == "on" and self.quantize == "fp32":
            raise BadInputError("rotation prepares a model for 8da4w or int8 quantization; "
                                "--quantize is fp32", field="rotation")
        if self.smoothing is not None and not 0 <= self.smoothing <= 1:
            raise BadInputError(f"SmoothQuant alpha must be in [0, 1], got {self.smoothing}",
                                field="smoothing")
        if self.calibration_samples < 1 or self.calibration_seq_len < 2:
            raise BadInputError("calibration_samples >= 1 and calibration_seq_len >= 2 are required",
                                field="calibration_samples")
        if self.max_len < 8 or self.greedy_tokens < 1:
            raise BadInputError("max_len >= 8 and greedy_tokens >= 1 are required", field="max_len")


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


def _dynamic_shapes(loaded: LoadedModel, names, inputs) -> tuple:
    dims: dict[str, torch.export.Dim] = {}
    dynamic = []
    axes_of = loaded.adapter.dynamic_axes()
    for name, _ in zip(names, inputs):
        axes = {}
        for axis, sym in axes_of.get(name, {}).items():
            if sym not in dims:
                upper = getattr(loaded.model.config, "max_position_embeddings", 4096) if sym == "seq" else 1024
                dims[sym] = torch.export.Dim(sym, min=2 if sym == "seq" else 1, max=upper)
            axes[axis] = dims[sym]
        dynamic.append(axes or None)
    return tuple(dynamic)


@contextlib.contextmanager
def _quiet_export():
    # The exporter logs one warning per torchvision op it cannot register; none are used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _optimize_onnx_ir(model, largest_elements: int) -> None:
    """What the dynamo exporter's `optimize=True` does, less onnxscript's pattern rewriter: inline,
    constant folding, dead-node removal, initializer lifting and deduplication, common
    subexpressions, then onnxscript's ONNX-op fusions. The rewriter's rules (no-op and slice
    clean-ups, transpose/reshape folds) are what onnxslim and ONNX Runtime's graph optimizer do
    again after it, yet its matcher took 40% of a 30-layer decoder's export (SmolLM2 forward: 117
    s -> 71 s without it, 2,172 nodes after onnxslim against 2,170; docs/export.md)."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer as opt
    import onnxscript.optimizer._constant_folding as opt_constants
    from onnxscript.rewriter import onnx_fusions

    opt.inline(model)
    # no fold may write a constant larger than every tensor the model stores (see export_onnx)
    kwargs = ({"output_size_limit": min(opt_constants.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                                        largest_elements)} if largest_elements else {})
    for _ in range(2):
        if not opt.fold_constants_ir(model, **kwargs).modified:
            break
        common.RemoveUnusedNodesPass()(model)
    for p in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
              common.RemoveUnusedOpsetsPass(),
              common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
              common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass()):
        p(model)
    onnx_fusions.fuse(model)


def export_onnx(module, inputs, path: Path, cfg: ExportConfig, *, input_names, output_names,
                dynamic_shapes, dynamic_axes_doc: dict) -> dict:
    """torch.export (so varargs modules and data-dependent shapes export the same way) ->
    ONNX (dynamo exporter) -> onnxslim -> checker -> optional ORT int8 dynamic quantization."""
    import onnx

    try:
        with _quiet_export():
            ep = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False)
            program = torch.onnx.export(ep, tuple(inputs), None, dynamo=True, optimize=False,
                                        input_names=list(input_names), output_names=list(output_names),
                                        verbose=False)
            # the largest tensor the model stores, before any fold: no fold may write a larger
            # constant, which could only be a product of stored factors (a factored embedding's
            # V x d' table); the file keeps the factors and ONNX Runtime folds it in memory at load
            stored = [v.const_value for v in program.model.graph.initializers.values()
                      if v.const_value is not None]
            largest_bytes = max((t.nbytes for t in stored), default=0)
            _optimize_onnx_ir(program.model, max((t.size for t in stored), default=0))
    except Exception as e:
        raise RuntimeFailure(f"ONNX export failed: {type(e).__name__}: {e}") from e
    proto = program.model_proto
    details = {"opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
               "nodes_exported": len(proto.graph.node), "dynamic_axes": dynamic_axes_doc}
    if cfg.simplify:
        import onnxslim

        proto = onnxslim.slim(proto, size_threshold=largest_bytes or None)
        details["simplifier"] = "onnxslim"
    details["nodes"] = len(proto.graph.node)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise RuntimeFailure(f"exported ONNX graph is invalid: {e}") from e
    if cfg.quantize == "int8":
        # the fp32 graph is staged in a temporary sibling that is never renamed into place
        import tempfile

        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".fp32.onnx", dir=path.parent)
        os.close(fd)
        fp32 = Path(name)
        try:
            onnx.save(proto, str(fp32))
            with fsutil.atomic_path(path) as tmp:
                details["quantization"] = {"scheme": "int8", "tool": "onnxruntime.quantization.quantize_dynamic",
                                           **quantize_onnx_dynamic(fp32, tmp)}
        finally:
            fp32.unlink(missing_ok=True)
    else:
        with fsutil.atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
    if cfg.ort_format:
        details["ort_format"] = _to_ort_format(path)
    return details


def _to_ort_format(path: Path) -> dict:
    """ONNX Runtime's mobile format plus the operator list a reduced runtime build needs."""
    import shutil
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import (OptimizationStyle,
                                                              convert_onnx_models_to_ort)

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        shutil.copyfile(path, staged)
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(staged, output_dir=Path(tmp) / "out",
                                       optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        produced = {p.suffix: p for p in (Path(tmp) / "out").iterdir()}
        ort_file, config = produced.get(".ort"), produced.get(".config")
        if ort_file is None or config is None:
            raise RuntimeFailure(f"ORT format conversion produced {sorted(produced)}", file=str(path))
        ort_dst = path.with_suffix(".ort")
        cfg_dst = path.with_suffix(".required_operators.config")
        for src, dst in ((ort_file, ort_dst), (config, cfg_dst)):
            with fsutil.atomic_path(dst) as t:
                shutil.copyfile(src, t)
    return {"ort": ort_dst.name, "ort_sha256": fsutil.sha256_file(ort_dst),
            "ort_size_bytes": ort_dst.stat().st_size, "required_operators": cfg_dst.name,
            "target_platform": "arm", "optimization_style": "Fixed"}


def export_pte(module, inputs, path: Path, cfg: ExportConfig, *, dynamic_shapes=None,
               plan: QuantPlan | None = None, reinplace: bool = False,
               forward_form: bool = False) -> dict:
    """`reinplace`: run ExecuTorch's re-inplacing pass, which turns a functional `index_put`
    on a mutable buffer into `index_put_` on the planned buffer (the KV-cache writes of a
    generation program; without it each write copies the whole cache twice). `forward_form`:
    trace a transformers model with its norms and attention in operators XNNPACK delegates
    whole (models/xnnpack_form.py; the generation programs write theirs by hand)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    if plan is not None and plan.scheme == "8da4w":
        import executorch.kernels.quantized  # noqa: F401  (embedding_byte for int8 embeddings)
    try:
        with _quiet_export(), torch.no_grad():
            with xnnpack_form(module) if forward_form else contextlib.nullcontext() as form:
                ep = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes,
                                         strict=False)
            with xnnpack_int4_per_channel(), lean_xnnpack_passes() as passes:
                edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            report = delegation_report(edge.exported_program().graph_module)
            share = report.flops_share
            if cfg.min_delegated_flops is not None and share is not None and share < cfg.min_delegated_flops:
                ops = ", ".join(f"{op} ({v['count']}x, {v['flops']:,} FLOPs)"
                                for op, v in list(report.portable_ops.items())[:8])
                raise BudgetError(f"delegation gate: {share:.2%} of FLOPs in XNNPACK (budget "
                                  f">= {cfg.min_delegated_flops:.0%}); left to portable kernels: {ops}",
                                  file=str(path), field="export.min_delegated_flops")
            # to_edge_transform_and_lower(generate_etrecord=True) loses the dynamic upper bounds
            # in memory planning; recording from a copy of the edge program keeps them
            edge_copy = copy.deepcopy(edge) if cfg.etrecord else None
            # ExecuTorch's default shape pass plans memory for the upper bound of every dynamic
            # dimension, provided nothing specialised it (see export/delegation.py `_dim`)
            program = edge.to_executorch(ExecutorchBackendConfig(
                do_quant_fusion_and_const_prop=plan is not None and plan.scheme == "8da4w",
                run_reinplace_pass=reinplace))
    except BudgetError:
        raise
    except Exception as e:
        raise RuntimeFailure(f"ExecuTorch export failed: {type(e).__name__}: {e}") from e
    fsutil.write_bytes(path, program.buffer)
    details = {"backend": "xnnpack", "delegation": report.to_dict(),
               # kept for readers of earlier reports
               "delegated_nodes": report.delegated_nodes, "non_delegated_nodes": report.portable_nodes,
               "delegated_share": _round(report.node_share),
               "non_delegated_ops": sorted(report.portable_ops)}
    if form:
        details["forward_form"] = form
    details["xnnpack_passes"] = passes.to_dict()
    if cfg.etrecord:
        et_path = Path(f"{path}.etrecord")
        from executorch.devtools import generate_etrecord

        with fsutil.atomic_path(et_path) as tmp:
            generate_etrecord(str(tmp), edge_copy, program)
        details["etrecord"] = et_path.name
    if plan is not None:
        details["quantization"] = plan.to_dict()
    return details


def _round(x):
    return None if x is None else round(x, 4)


def _limits(cfg: ExportConfig) -> dict:
    """Parity limits: fp32 artifacts are gated on cosine and max abs diff; quantized ones on
    cosine only (their max abs diff is recorded, not gated)."""
    if cfg.quantize != "fp32":
        return {"min_cosine": cfg.quant_min_cosine, "max_abs": float("inf")}
    return {"min_cosine": cfg.parity_min_cosine, "max_abs": cfg.parity_max_abs}


def _eager(module, inputs) -> np.ndarray:
    with torch.inference_mode():
        out = module(*inputs)
    return (out[0] if isinstance(out, tuple) else out).numpy()


def _write_record(out_dir: Path, path: Path, record: "ArtifactRecord", loaded: LoadedModel,
                  names, inputs, extra: dict | None = None) -> None:
    with fsutil.atomic_path(Path(f"{path}.inputs.npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{n: t.numpy() for n, t in zip(names, inputs)})
    source = loaded.origin or loaded.source
    if Path(source).exists():
        source = str(Path(source).resolve())
    sidecar = {**record.to_dict(), "family": loaded.family, "source": source,
               "versions": versions(), **(extra or {})}
    fsutil.write_json(Path(f"{path}.json"), sidecar)


def _stem(name: str, cfg: ExportConfig) -> str:
    return name if cfg.quantize == "fp32" else f"{name}-{cfg.quantize}"


def export_model(loaded: LoadedModel, out_dir: str | Path, cfg: ExportConfig | None = None,
                 *, name: str = "model", recipe_sha256: str | None = None) -> list[ArtifactRecord]:
    """Export to each format, check parity against eager, and write `<name>[-<quant>].<fmt>` plus
    a sidecar `<file>.json` (inputs, parity, quantization, delegation, versions, recipe hash)
    and `<file>.inputs.npz`. Decoders also get `<stem>-gen.<fmt>`, the KV-cache generation
    graph, checked by greedy-token agreement with eager `transformers` generation."""
    cfg = cfg or ExportConfig()
    cfg.validate()
    if cfg.calibration:
        from pocketformer.data import DataSpec

        DataSpec.parse(cfg.calibration, field="export.calibration").check_exists(field="export.calibration")
    module = loaded.adapter.export_module(loaded)
    if cfg.int8_linears:
        from pocketformer.export.quantize import int8_names

        int8_names(module, cfg.int8_linears)      # a pattern naming nothing: bad input, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(name, cfg)
    plan = None
    pte_module = module
    pte_loaded, group, rounding, rotation = loaded, cfg.group_size, None, None
    if "pte" in cfg.formats and cfg.quantize != "fp32":
        pte_loaded, group, rounding, rotation = _calibrated_rounding(loaded, module, cfg)
        say(f"export: quantize {cfg.quantize} for ExecuTorch")
        pte_module, plan = quantize_for_executorch(
            module if pte_loaded is loaded else pte_loaded.adapter.export_module(pte_loaded),
            cfg.quantize, group, lm_head=cfg.lm_head, int8_linears=cfg.int8_linears)
        plan.gptq, plan.rotation = rounding, rotation
        check_plan(plan, cfg.max_unquantized_share)
    onnx_loaded, onnx_prep = _prepare_int8_onnx(loaded, cfg)
    onnx_module = module if onnx_loaded is loaded else onnx_loaded.adapter.export_module(onnx_loaded)
    extra = {"recipe_sha256": recipe_sha256} if recipe_sha256 else {}
    records = []
    names, outputs = loaded.adapter.input_names, loaded.adapter.output_names
    for fmt in cfg.formats:
        inputs = loaded.adapter.example_inputs(loaded, batch=cfg.batch, seq_len=cfg.seq_len)
        checks = [inputs]
        if fmt == "onnx" and cfg.batch == 1:
            # Dynamic axes are traced with batch 2 so the exporter cannot specialise them to 1;
            # parity is then checked at both batch sizes.
            checks.append(loaded.adapter.example_inputs(loaded, batch=2, seq_len=cfg.seq_len))
        path = out_dir / f"{stem}.{fmt}"
        say(f"export: {fmt} -> {path}")
        start = time.perf_counter()
        if fmt == "onnx":
            axes_doc = {k: {str(a): s for a, s in v.items()} for k, v in loaded.adapter.dynamic_axes().items()}
            details = export_onnx(onnx_module, checks[-1], path, cfg, input_names=names,
                                  output_names=outputs,
                                  dynamic_shapes=_dynamic_shapes(loaded, names, checks[-1]),
                                  dynamic_axes_doc=axes_doc)
            if onnx_prep:
                details["quantization"].update(onnx_prep)
            reference = onnx_module
        else:
            details = export_pte(pte_module, checks[-1], path, cfg, plan=plan,
                                 forward_form=cfg.xnnpack_form)
            reference = pte_module
        seconds = time.perf_counter() - start
        runner = open_artifact(path)
        quantized = cfg.quantize != "fp32"
        got = [runner(*x) for x in checks]
        fp32 = [_eager(module, x) for x in checks]
        expected = fp32 if reference is module else [_eager(reference, x) for x in checks]
        parity = min((compare(e, out, **_limits(cfg)) for e, out in zip(expected, got)),
                     key=lambda p: (p.passed, p.cosine, -p.max_abs_diff)).to_dict()
        parity["reference"] = "eager " + ("torchao-quantized module" if fmt == "pte" and quantized
                                          else "fp32 module")
        if quantized:
            parity["cosine_vs_fp32"] = min(compare(e, out, min_cosine=0, max_abs=np.inf).cosine
                                           for e, out in zip(fp32, got))
        if getattr(runner, "host_twin", None):
            parity["host_kernel"] = runner.host_twin
        record = ArtifactRecord(
            format=fmt, path=path.name, runtime=RUNTIME_OF[fmt], quantization=cfg.quantize,
            size_bytes=path.stat().st_size, sha256=fsutil.sha256_file(path),
            export_seconds=round(seconds, 3), inputs=_input_specs(names, inputs),
            outputs=list(outputs), parity=parity, details=details)
        _write_record(out_dir, path, record, loaded, names, inputs, extra)
        records.append(record)
    generation = cfg.generation if cfg.generation is not None else loaded.adapter.data_kind == "text" \
        and loaded.family == "llama"
    if generation:
        if loaded.family != "llama":
            raise BadInputError(f"generation export is for decoders; {loaded.family} is not one",
                                field="generation")
        for fmt in cfg.formats:
            records.append(export_generation(pte_loaded if fmt == "pte" else onnx_loaded, out_dir,
                                             fmt, cfg, stem=stem, extra=extra, group_size=group,
                                             rounding=rounding, rotation=rotation, prep=onnx_prep))
    return records


def _calibrated_rounding(loaded: LoadedModel, module, cfg: ExportConfig):
    """The model the 8da4w program is made from: rotated (export/rotate.py) when asked for or,
    with rotation "auto", when GPTQ runs on a model that can be rotated; then GPTQ-rounded
    (export/gptq.py) when asked for or, with rounding "auto", when calibration data is given;
    otherwise the model itself with RTN. Returns (model for the .pte, group size, the GPTQ
    report as a dict or None, the rotation report as a dict or None)."""
    from pocketformer.export.quantize import group_for

    if cfg.quantize != "8da4w":
        return loaded, cfg.group_size, None, None
    if cfg.rounding == "grid" or (cfg.rounding == "auto" and _has_lowrank(loaded)):
        from pocketformer.export.grid import grid_model

        if cfg.int8_linears:
            raise BadInputError("this model's low-rank factors select grid rounding, which writes "
                                "every linear on its 4-bit block grid; keeping linears at 8 bits "
                                "needs --rounding gptq or rtn", field="int8_linears")
        group = cfg.group_size or 32
        gridded, report = grid_model(loaded, group)
        say(f"export: grid rounding, group {group}: {report.exact_blocks}/{report.blocks} blocks exact, "
            f"{report.with_lowrank} linears with a rank-{report.lowrank_rank} term beside them")
        details = {"method": "grid", **report.to_dict()}
        if cfg.lm_head == "int4" and cfg.calibration and cfg.rounding != "rtn":
            # the output head is not on a 4-bit grid (a tied Q8_0 table): GPTQ rounds it alone
            from pocketformer.export.gptq import gptq_round_model

            batches, spec = _calibration_batches(gridded, cfg)
            say(f"export: gptq rounding of the output head, group {group}, on {cfg.calibration}")
            gridded, head = gptq_round_model(gridded, batches, group, include_layers=False)
            details["head"] = {**head.to_dict(), "calibration": str(spec)}
        elif cfg.lm_head == "int4":
            say("export: grid rounding with an int4 head and no calibration data: the head is "
                "rounded to nearest (costly on SmolLM2; give --calibration or --lm-head int8)")
        return gridded, group, details, None
    gptq = not (cfg.rounding == "rtn" or (cfg.rounding == "auto" and not cfg.calibration))
    loaded, rotation = _rotated(loaded, cfg, auto=gptq)
    # rotated and GPTQ-rounded, a larger group costs little quality: the default is size first
    group = group_for(module, cfg.group_size, size_first=bool(gptq and rotation))
    if not gptq:
        return loaded, group, None, rotation
    from pocketformer.export.gptq import gptq_round_model

    batches, spec = _calibration_batches(loaded, cfg)
    say(f"export: gptq rounding for 8da4w {f'group {group}' if group else 'per output channel'} on {cfg.calibration} "
        f"({cfg.calibration_samples} samples)")
    rounded, report = gptq_round_model(loaded, batches, group, include_head=cfg.lm_head == "int4",
                                       keep=_kept_linears(loaded, cfg))
    return rounded, group, {**report.to_dict(), "calibration": str(spec)}, rotation


def _kept_linears(loaded: LoadedModel, cfg: ExportConfig) -> list[str]:
    """The names, in `loaded.model`, of the linears `cfg.int8_linears` keeps at 8 bits: matched on
    the export module's names, as quantize_for_executorch matches them, so GPTQ leaves exactly
    those unrounded."""
    from pocketformer.export.quantize import int8_names

    if not cfg.int8_linears:
        return []
    module = loaded.adapter.export_module(loaded)
    by_name = dict(module.named_modules())
    ids = {id(by_name[n]) for n in int8_names(module, cfg.int8_linears)}
    return [n for n, m in loaded.model.named_modules() if id(m) in ids]


def _has_lowrank(loaded: LoadedModel) -> bool:
    """Whether the model's linears carry low-rank recovery factors (compress/recovery.py LowRank):
    then their base weights are the original ones and grid rounding keeps both exactly."""
    return any(getattr(m, "pf_lowrank", None) is not None for m in loaded.model.modules())


def _rotated(loaded: LoadedModel, cfg: ExportConfig, *, auto: bool):
    """The model rotated (export/rotate.py) when rotation is "on", or "auto" and `auto` holds
    for a model that can be rotated; else unchanged. Returns (model, rotation report or None)."""
    from pocketformer.export.rotate import rotatable, rotate_model

    if cfg.rotation == "on" or (cfg.rotation == "auto" and auto and rotatable(loaded) is None):
        rotated, report = rotate_model(loaded, check_inputs=loaded.adapter.example_inputs(loaded))
        return rotated, report.to_dict()
    return loaded, None


def _calibration_batches(loaded: LoadedModel, cfg: ExportConfig):
    from pocketformer.data import DataSpec, load_for

    spec = DataSpec.parse(cfg.calibration, field="export.calibration")   # checked in export_model
    data = load_for(loaded.adapter.data_kind, spec)
    batches = loaded.adapter.calibration_inputs(loaded, data, max_samples=cfg.calibration_samples,
                                                seq_len=cfg.calibration_seq_len, batch_size=8)
    return batches, spec


def _prepare_int8_onnx(loaded: LoadedModel, cfg: ExportConfig):
    """The model the int8 ONNX graph is made from. ONNX Runtime's dynamic quantization keeps one
    uint8 scale per activation tensor, so channels with outliers set it for everything: an RMSNorm
    decoder is rotated (export/rotate.py) when asked for or, under "auto", when calibration data
    is given, and with calibration data its FFN down-projection inputs are smoothed (SmoothQuant,
    alpha `cfg.smoothing`). Both leave the fp32 function unchanged. Returns (model, a dict for
    the sidecar's quantization section or None)."""
    from pocketformer.export.rotate import smooth_ffn

    if cfg.quantize != "int8" or "onnx" not in cfg.formats:
        return loaded, None
    prep = {}
    loaded, rotation = _rotated(loaded, cfg, auto=bool(cfg.calibration))
    if rotation:
        prep["rotation"] = rotation
    if cfg.calibration and cfg.smoothing and loaded.family == "llama":
        batches, spec = _calibration_batches(loaded, cfg)
        loaded, report = smooth_ffn(loaded, batches, alpha=cfg.smoothing)
        prep["smoothing"] = {**report.to_dict(), "calibration": str(spec)}
    return loaded, (prep or None)


RUNTIME_OF = {"onnx": "onnxruntime", "pte": "executorch"}


def greedy_prompt(loaded: LoadedModel) -> list[int]:
    if loaded.tokenizer is not None:
        ids = loaded.adapter.token_ids(loaded, GREEDY_PROMPT).tolist()
        if ids:
            return ids
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, loaded.model.config.vocab_size, (12,), generator=g).tolist()


def export_generation(loaded: LoadedModel, out_dir: Path, fmt: str, cfg: ExportConfig, *,
                      stem: str, extra: dict, group_size: int | None = None,
                      rounding: dict | None = None, rotation: dict | None = None,
                      prep: dict | None = None) -> ArtifactRecord:
    """The KV-cache generation graph (pocketformer/models/generation.py) for one format, with
    prefill-logit parity and greedy agreement against eager generation."""
    from pocketformer.models.generation import (CachedLM, CacheIOLM, example_step_inputs,
                                                greedy_eager, greedy_loop)

    model = loaded.model
    max_len = cfg.max_len
    seq = torch.export.Dim("seq", min=1, max=max_len - 1)
    path = out_dir / f"{stem}-gen.{fmt}"
    say(f"export: {fmt} generation graph (KV cache {max_len}) -> {path}")
    start = time.perf_counter()
    plan = None
    if fmt == "pte":
        module = CachedLM(model, max_len, logits=cfg.gen_logits).eval()
        if cfg.quantize != "fp32":
            module, plan = quantize_for_executorch(module, cfg.quantize,
                                                   cfg.group_size if group_size is None else group_size,
                                                   lm_head=cfg.lm_head,
                                                   int8_linears=cfg.int8_linears)
            plan.gptq, plan.rotation = rounding, rotation
            check_plan(plan, cfg.max_unquantized_share)
        inputs = example_step_inputs(model, max_len)
        names, outputs = module.input_names, module.output_names
        # a head at one position (the default "last" logits) reads a factored table's term
        # weights stored in the program, not rebuilt by portable gathers on each step
        held = stored_term_weights(module) if cfg.gen_logits == "last" else contextlib.nullcontext()
        with held:
            details = export_pte(module, inputs, path, cfg, dynamic_shapes=({1: seq}, None), plan=plan,
                                 reinplace=True)
    else:
        module = CacheIOLM(model, max_len, logits=cfg.gen_logits).eval()
        inputs = example_step_inputs(model, max_len, with_caches=True)
        names, outputs = module.input_names, module.output_names
        details = export_onnx(module, inputs, path, cfg, input_names=names, output_names=outputs,
                              dynamic_shapes=({1: seq}, None, tuple(None for _ in inputs[2:])),
                              dynamic_axes_doc={"tokens": {"1": "seq"}})
        if prep and "quantization" in details:
            details["quantization"].update(prep)
    seconds = time.perf_counter() - start

    # prefill logits vs the eager module that was exported, from empty caches (export runs on
    # fake tensors, so the .pte module's buffers are still zero; the ONNX module holds none)
    for name, buf in module.named_buffers():
        if "cache" in name:
            buf.zero_()
    expected = _eager(module, inputs)
    gen = open_generator(path)
    got = gen(inputs[0].numpy(), 0)
    quantized = cfg.quantize != "fp32"
    parity = compare(expected, got, **_limits(cfg)).to_dict()
    parity["reference"] = "eager prefill of the exported module"

    prompt = greedy_prompt(loaded)
    n = min(cfg.greedy_tokens, max_len - len(prompt))
    # eager reference and its decode speed: generate(n) minus generate(1), same prompt, same process
    _, e1 = greedy_eager(model, prompt, 1)
    eager_tokens, en = greedy_eager(model, prompt, n)
    gen.reset()
    tokens, timing = greedy_loop(gen, prompt, n, max_len)
    match = next((i for i, (a, b) in enumerate(zip(tokens, eager_tokens)) if a != b), n)
    eager_decode = (n - 1) / (en["seconds"] - e1["seconds"]) if en["seconds"] > e1["seconds"] else None
    parity.update({"greedy_tokens": n, "greedy_match_prefix": match,
                   "greedy_agreement": round(match / n, 4)})
    if not quantized:
        parity["passed"] = bool(parity["passed"] and match == n)
    details["generation"] = {
        "max_len": max_len, "logits": cfg.gen_logits, "prompt": GREEDY_PROMPT if loaded.tokenizer is not None else "random ids",
        "prompt_tokens": len(prompt), "tokens": tokens, "eager_tokens": eager_tokens,
        "ttft_ms": round(timing["ttft_s"] * 1e3, 3),
        "decode_tokens_per_s": _round(timing["decode_tokens_per_s"]),
        "eager_decode_tokens_per_s": _round(eager_decode),
        "eager": "transformers generate (dynamic KV cache), greedy, same process",
    }
    # the benchmark's default input: one decode step after the prompt
    bench_inputs = [torch.tensor([[prompt[-1]]]), torch.tensor([len(prompt)])] + list(inputs[2:])
    record = ArtifactRecord(
        format=fmt, path=path.name, runtime=RUNTIME_OF[fmt], quantization=cfg.quantize,
        size_bytes=path.stat().st_size, sha256=fsutil.sha256_file(path),
        export_seconds=round(seconds, 3), inputs=_input_specs(names, bench_inputs),
        outputs=list(outputs), parity=parity, details=details)
    _write_record(out_dir, path, record, loaded, names, bench_inputs,
                  {**extra, "kind": "generation", "max_len": max_len, "logits": cfg.gen_logits})
    return record

