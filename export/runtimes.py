"""Python bindings of the two runtimes, behind one call signature: runner(*tensors) -> ndarray.

Used by the parity checks here, by `pocketformer eval` on shipped files, and by the host
benchmark's Python tier. Native runners (C/C++) live in runtime_bench.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pocketformer.errors import BadInputError, RuntimeFailure


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
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
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


class EtGenerator:
    """A `-gen.pte` step program: the KV cache lives in the Method's planned buffers, so the
    same loaded Method is called for prefill and every decode step."""

    def __init__(self, path, threads=None):
        self.runner = EtRunner(path, threads)

    def reset(self) -> None:
        pass  # positions past the current one are masked; a new prompt overwrites from 0

    def __call__(self, ids: np.ndarray, pos: int) -> np.ndarray:
        return self.runner(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)),
                           torch.tensor([pos], dtype=torch.long))


class OrtGenerator:
    """A `-gen.onnx` step graph: past_* in, present_* out; this object carries the cache."""

    def __init__(self, path, threads=None):
        self.runner = OrtRunner(path, threads)
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


def open_generator(path: str | os.PathLike, threads: int | None = None):
    path = Path(path)
    if not path.is_file():
        raise BadInputError("artifact not found", file=str(path))
    cls = {".onnx": OrtGenerator, ".pte": EtGenerator}.get(path.suffix)
    if cls is None:
        raise BadInputError(f"unknown artifact type {path.suffix!r}; expected .onnx or .pte",
                            file=str(path))
    return cls(path, threads)


def open_artifact(path: str | os.PathLike, threads: int | None = None):
    path = Path(path)
    if not path.is_file():
        raise BadInputError("artifact not found", file=str(path))
    runner = RUNNERS.get(path.suffix)
    if runner is None:
        raise BadInputError(f"unknown artifact type {path.suffix!r}; expected .onnx or .pte",
                            file=str(path))
    return runner(path, threads)
