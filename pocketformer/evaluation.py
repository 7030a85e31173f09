"""Quality metrics: perplexity (decoders), STS Spearman (encoders), top-1 accuracy (classifiers).

Every metric runs through a callable with the adapter's export signature, so the same code
scores the PyTorch model, an ONNX Runtime session or an ExecuTorch program.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from pocketformer.data import ImageData, PairData, TextData
from pocketformer.errors import BadInputError
from pocketformer.models import LoadedModel
from pocketformer.progress import progress

# task -> (metric name in JSON, higher is better, adapter family that produces it)
TASKS = {
    "ppl": ("perplexity", False, "llama"),
    "sts": ("spearman", True, "bert"),
    "accuracy": ("accuracy", True, "vit"),
}

Forward = Callable[..., "torch.Tensor | np.ndarray"]


@dataclass
class EvalOptions:
    seq_len: int = 256          # perplexity window (tokens)
    max_windows: int = 64       # perplexity: windows scored (64 x 256 = 16k tokens)
    batch_size: int = 16


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    higher_is_better: bool
    samples: int
    data: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        x = x[0]
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def check_task(loaded: LoadedModel, task: str) -> None:
    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}",
                            field="task")
    family = TASKS[task][2]
    if loaded.family != family:
        raise BadInputError(f"task {task!r} needs a {family} model, {loaded.source} is "
                            f"{loaded.family} (its task is {loaded.adapter.task!r})", field="task")


def perplexity(loaded: LoadedModel, fn: Forward, data: TextData, opts: EvalOptions) -> tuple[float, int]:
    adapter = loaded.adapter
    ids = adapter.token_ids(loaded, data.text)
    n = min(opts.max_windows, len(ids) // opts.seq_len)
    if n < 1:
        raise BadInputError(f"perplexity needs at least {opts.seq_len} tokens, got {len(ids)}",
                            file=data.source)
    windows = ids[: n * opts.seq_len].view(n, opts.seq_len)
    nll, count = 0.0, 0
    bs = max(1, opts.batch_size // 4)
    for i in progress(range(0, n, bs), "perplexity", total=math.ceil(n / bs)):
        batch = windows[i:i + bs]
        logits = _as_tensor(fn(batch)).float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:]
        nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
    return math.exp(nll / count), count


def embed(loaded: LoadedModel, fn: Forward, sentences: list[str], opts: EvalOptions) -> torch.Tensor:
    out = []
    batches = loaded.adapter.encode_batches(loaded, sentences, batch_size=opts.batch_size)
    for ids, mask in progress(batches, "embed"):
        out.append(_as_tensor(fn(ids, mask)).float())
    return torch.cat(out)


def sts_spearman(loaded: LoadedModel, fn: Forward, data: PairData, opts: EvalOptions
                 ) -> tuple[float, int]:
    from scipy.stats import spearmanr

    if not isinstance(data, PairData):
        raise BadInputError("STS needs scored sentence pairs (tab-separated genre, file, year, "
                            "id, score, sentence1, sentence2)", file=data.source)
    a = embed(loaded, fn, data.first, opts)
    b = embed(loaded, fn, data.second, opts)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()
    return float(spearmanr(cos, data.scores).statistic), len(cos)


def accuracy(loaded: LoadedModel, fn: Forward, data: ImageData, opts: EvalOptions) -> tuple[float, int]:
    x = loaded.adapter.pixel_values(loaded, data)
    labels = torch.as_tensor(data.labels)
    correct = 0
    for i in progress(range(0, len(x), opts.batch_size), "accuracy"):
        logits = _as_tensor(fn(x[i:i + opts.batch_size]))
        correct += int((logits.argmax(-1) == labels[i:i + opts.batch_size]).sum())
    return correct / len(x), len(x)


def evaluate(loaded: LoadedModel, task: str, data, *, fn: Forward | None = None,
             opts: EvalOptions | None = None) -> EvalResult:
    """Score `loaded` (or `fn`, a runtime with the same signature) on `data`."""
    check_task(loaded, task)
    opts = opts or EvalOptions()
    if fn is None:
        module = loaded.adapter.export_module(loaded)

        def fn(*args):
            with torch.inference_mode():
                return module(*args)
    metric, higher, _ = TASKS[task]
    start = time.perf_counter()
    scorer = {"ppl": perplexity, "sts": sts_spearman, "accuracy": accuracy}[task]
    value, samples = scorer(loaded, fn, data, opts)
    return EvalResult(task, metric, value, higher, samples, data.source,
                      time.perf_counter() - start)


def artifact_forward(path, opts: EvalOptions) -> tuple[Forward, EvalOptions, dict]:
    """A forward callable with the adapter's export signature, backed by an exported file
    (`.pte` through ExecuTorch, `.onnx` through ONNX Runtime), so quality is measured on the
    file the app ships. Static `.pte` forward graphs are fed one row at a time, with token
    inputs padded (mask 0) to the exported length; decoder windows take the exported length.
    Generation graphs (`*-gen.*`) score a window from position 0: one call when their steps
    return every position's logits, one call per position when they return the last one's."""
    from pathlib import Path

    from pocketformer.export import load_sidecar, open_artifact
    from pocketformer.export.runtimes import open_generator, score_positions

    path = Path(path)
    side = load_sidecar(path)
    if side is None:
        raise BadInputError("no sidecar <artifact>.json beside the file (it records the model "
                            "family, tokenizer source and input shapes); export it with "
                            "`pocketformer export`", file=str(path))
    note = {"artifact": str(path), "runtime": side.get("runtime"), "kind": side.get("kind", "forward"),
            "quantization": side.get("quantization")}
    if note["kind"] == "generation":
        gen = open_generator(path)
        max_len = int(side["max_len"])
        if opts.seq_len > max_len - 1:
            opts = EvalOptions(**{**asdict(opts), "seq_len": max_len - 1})
            note["seq_len_note"] = f"window cut to the exported KV cache: {max_len - 1} tokens"

        def gen_fn(batch):
            outs = []
            for row in _as_tensor(batch):
                outs.append(score_positions(gen, row.numpy(), 0))
            return np.stack(outs)
        return gen_fn, opts, note

    runner = open_artifact(path)
    shapes = [i["shape"] for i in side["inputs"]]
    if path.suffix == ".onnx":
        return (lambda *args: runner(*args)), opts, note
    if side.get("family") == "llama" and shapes and opts.seq_len != shapes[0][1]:
        opts = EvalOptions(**{**asdict(opts), "seq_len": shapes[0][1]})
        note["seq_len_note"] = f"window set to the exported static length {shapes[0][1]}"

    def static_fn(*args):
        args = [_as_tensor(a) for a in args]
        rows = []
        for i in range(args[0].shape[0]):
            row = []
            for a, shape in zip(args, shapes):
                r = a[i:i + 1]
                if r.dim() == 2 and not r.is_floating_point() and r.shape[1] != shape[1]:
                    if r.shape[1] > shape[1]:
                        r = r[:, :shape[1]]
                    else:
                        r = torch.nn.functional.pad(r, (0, shape[1] - r.shape[1]))
                row.append(r.contiguous())
            rows.append(runner(*row))
        return np.concatenate(rows)
    return static_fn, opts, note


def relative_drop(before: float, after: float, higher_is_better: bool) -> float:
    """Fractional degradation: (before-after)/before for scores, (after-before)/before for perplexity."""
    if before == 0:
        return 0.0
    return (before - after) / abs(before) if higher_is_better else (after - before) / abs(before)
