"""Python bindings of the two runtimes, behind one call signature: runner(*tensors) -> ndarray.

Used by the parity checks here, by `pocketformer eval` on shipped files, and by the host
benchmark's Python tier. Native runners (C/C++) live in runtime_bench.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pocketformer.errors import BadInputError, RuntimeFailure


_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def host_u8s8_saturates() -> bool:
    """True on an x86-64 CPU without VNNI. There ONNX Runtime's uint8 x int8 GEMM (the int8
    export's MatMulInteger) uses VPMADDUBSW, which adds pairs of u8*s8 products in int16 and
    saturates; VNNI CPUs and ARM's dot-product kernels accumulate in int32 and do not. So on
    such a host the file's outputs are not the ones a phone computes (docs/export.md)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return not (_VNNI_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def u8u8_twin(model) -> int:
    """Rewrite, in place, every int8 weight of a MatMulInteger / DynamicQuantizeMatMul as uint8
    shifted by 128, with its zero point shifted by the same 128: (b + 128) - (zb + 128) = b - zb,
    so every integer product and sum is unchanged, but ONNX Runtime then runs its u8u8 kernel,
    which does not saturate on x86 (the exact arithmetic the phone does). Returns the number of
    weights rewritten."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done: set[str] = set()
    weights = 0

    def shift(init):
        arr = numpy_helper.to_array(init).astype(np.int16) + 128
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.uint8), init.name))
        done.add(init.name)

    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "DynamicQuantizeMatMul") or len(node.input) < 2:
            continue
        b = inits.get(node.input[1])
        if b is None or (b.name not in done and b.data_type != onnx.TensorProto.INT8):
            continue
        zp_name = node.input[3] if len(node.input) > 3 else ""
        if zp_name and zp_name not in inits:
            continue  # a zero point computed at run time: leave this node as it is
        if b.name not in done:
            shift(b)
            weights += 1
        if not zp_name:  # no zero point means 0, which is 128 once shifted
            zp_name = f"{b.name}__u8u8_zero_point"
            if zp_name not in inits:
                model.graph.initializer.append(
                    numpy_helper.from_array(np.array(128, dtype=np.uint8), zp_name))
                inits[zp_name] = model.graph.initializer[-1]
            while len(node.input) < 4:   # the slot may exist, empty (DynamicQuantizeMatMul's bias follows)
                node.input.append("")
            node.input[3] = zp_name
        elif zp_name not in done:
            shift(inits[zp_name])
    return weights


def _has_integer_matmul(path) -> bool:
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"MatMulInteger") >= 0 or m.find(b"DynamicQuantizeMatMul") >= 0
    except (OSError, ValueError):
        return False  # unreadable or empty: ORT's own load reports it


class OrtRunner:
    runtime = "onnxruntime"

    @staticmethod
    def import_runtime() -> None:
        """Import the bindings up front, so load timings measure the model, not Python imports."""
        import onnxruntime  # noqa: F401

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # On a host whose u8s8 kernel saturates, an int8 file runs as its exact u8u8 twin, so
        # parity checks and quality figures are the phone's arithmetic, not this CPU's artefact.
        self.host_twin = None
        source = str(path)
        if host_u8s8_saturates() and _has_integer_matmul(path):
            import onnx

            model = onnx.load(str(path))
            if u8u8_twin(model):
                source = model.SerializeToString()
                self.host_twin = ("int8 weights run as their exact u8u8 twin: this x86 CPU has "
                                  "no VNNI, so ONNX Runtime's u8s8 kernel would saturate")
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad files
            raise BadInputError(f"ONNX Runtime cannot load this file: {e}", file=str(path)) from e
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *tensors) -> np.ndarray:
        feeds = {n: (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
                 for n, t in zip(self.input_names, tensors)}
        try:
            return self.session.run(None, feeds)[0]
        except Exception as e:
            raise RuntimeFailure(f"ONNX Runtime inference failed: {e}") from e


class EtRunner:
    runtime = "executorch"

    @staticmethod
    def import_runtime() -> None:
        # the quantized kernel library registers embedding_byte & co. (8da4w's int8 embeddings);
        # without it such a program fails to load with OperatorMissing in a fresh process
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        Runtime.get()

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from executorch.runtime import Runtime

        self.import_runtime()
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            _unsafe_reset_threadpool(threads)
        try:
            self.program = Runtime.get().load_program(Path(path))
            self.method = self.program.load_method("forward")
        except Exception as e:
            raise BadInputError(f"ExecuTorch cannot load this program: {e}", file=str(path)) from e

    def __call__(self, *tensors) -> np.ndarray:
        args = [t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in tensors]
        try:
            return self.method.execute(args)[0].numpy()
        except Exception as e:
            raise RuntimeFailure(f"ExecuTorch inference failed: {e}") from e


RUNNERS = {".onnx": OrtRunner, ".pte": EtRunner}


def load_sidecar(artifact: str | os.PathLike) -> dict | None:
    """The `<artifact>.json` that `pocketformer export` writes beside each file, or None."""
    side = Path(f"{artifact}.json")
    return json.loads(side.read_text()) if side.is_file() else None


def _logits_rows(path: Path) -> str:
    """What a generation program's steps return: "all" positions' logits or the "last" one's.
    Programs exported before the choice existed return all; with no sidecar the answer is
    "last", which scoring treats the safe way (one position per call)."""
    side = load_sidecar(path)
    return "last" if side is None else str(side.get("logits", "all"))


class EtGenerator:
    """A `-gen.pte` step program: the KV cache lives in the Method's planned buffers, so the
    same loaded Method is called for prefill and every decode step."""

    def __init__(self, path, threads=None):
        self.runner = EtRunner(path, threads)
        self.logits = _logits_rows(Path(path))

    def reset(self) -> None:
        pass  # positions past the current one are masked; a new prompt overwrites from 0

    def __call__(self, ids: np.ndarray, pos: int) -> np.ndarray:
        return self.runner(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                           torch.tensor([pos], dtype=torch.long))


class OrtGenerator:
    """A `-gen.onnx` step graph: past_* in, present_* out; this object carries the cache."""

    def __init__(self, path, threads=None):
        self.runner = OrtRunner(path, threads)
        self.logits = _logits_rows(Path(path))
        inputs = self.runner.session.get_inputs()
        self.cache_specs = [(i.name, i.shape) for i in inputs[2:]]
        self.reset()

    def reset(self) -> None:
        self.cache = [np.zeros(shape, dtype=np.float32) for _, shape in self.cache_specs]

    def __call__(self, ids: np.ndarray, pos: int) -> np.ndarray:
        feeds = dict(zip(self.runner.input_names,
                         [np.asarray(ids, dtype=np.int64), np.asarray([pos], dtype=np.int64)] + self.cache))
        try:
            out = self.runner.session.run(None, feeds)
        except Exception as e:
            raise RuntimeFailure(f"ONNX Runtime inference failed: {e}") from e
        self.cache = out[1:]
        return out[0]


def score_positions(gen, ids, first: int = 0) -> np.ndarray:
    """The logits `[len(ids) - first, V]` of positions `first .. len(ids) - 1` of the token ids
    `ids`, fed from position 0 of an emptied cache, for either kind of generation program: one
    call when its steps return every position's logits, else one call up to `first` and then
    one call per position (a last-only program computes the head once per call)."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if not 0 <= first < len(ids):
        raise ValueError(f"first position {first} is outside the {len(ids)} ids")
    gen.reset()
    if getattr(gen, "logits", "last") == "all":
        return np.asarray(gen(ids[None], 0))[0, first:]
    rows = [np.asarray(gen(ids[None, :first + 1], 0))[0, -1]]
    for pos in range(first + 1, len(ids)):
        rows.append(np.asarray(gen(ids[None, pos:pos + 1], pos))[0, -1])
    return np.stack(rows)


def _open(path: str | os.PathLike, classes: dict, threads: int | None):
    path = Path(path)
    if not path.is_file():
        raise BadInputError("artifact not found", file=str(path))
    cls = classes.get(path.suffix)
    if cls is None:
        raise BadInputError(f"unknown artifact type {path.suffix!r}; expected .onnx or .pte",
                            file=str(path))
    return cls(path, threads)


def open_generator(path: str | os.PathLike, threads: int | None = None):
    return _open(path, {".onnx": OrtGenerator, ".pte": EtGenerator}, threads)


def open_artifact(path: str | os.PathLike, threads: int | None = None):
    return _open(path, RUNNERS, threads)
