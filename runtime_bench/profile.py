"""Per-operator profile of a `.pte` from ExecuTorch's ETDump, mapped back to the model through the
ETRecord that `pocketformer export` writes beside the program. Generation programs are profiled
per decode step (after one prefill), forward programs per inference. Host, Python bindings."""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.export import load_sidecar


def etdump_profile(artifact: str | Path, *, steps: int = 16, threads: int = 2,
                   prompt_tokens: int = 64, top: int = 20) -> dict:
    """Median milliseconds per step for each operator / delegate event, the step total and the
    number of delegate and portable-operator calls per step."""
    import torch

    import executorch.kernels.quantized  # noqa: F401  (embedding_byte & co.)
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import (_load_for_executorch,
                                                              _unsafe_reset_threadpool)

    artifact = Path(artifact)
    if artifact.suffix != ".pte" or not artifact.is_file():
        raise BadInputError("a per-operator profile needs an exported .pte", file=str(artifact))
    etrecord = Path(f"{artifact}.etrecord")
    side = load_sidecar(artifact) or {}
    _unsafe_reset_threadpool(threads)
    try:
        module = _load_for_executorch(str(artifact), enable_etdump=True, debug_buffer_size=0)
    except Exception as e:
        raise BadInputError(f"ExecuTorch cannot load this program: {e}", file=str(artifact)) from e
    gen = side.get("kind") == "generation"
    with torch.no_grad():
        if gen:
            prompt = min(prompt_tokens, int(side.get("max_len", 256)) - steps - 1)
            vocab = module.forward((torch.tensor([[1]]), torch.tensor([0])))[0].shape[-1]
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(3, vocab, (1, prompt), generator=g)
            nxt = int(module.forward((ids, torch.tensor([0])))[0][0, -1].argmax())
            for pos in range(prompt, prompt + steps):
                out = module.forward((torch.tensor([[nxt]]), torch.tensor([pos])))[0]
                nxt = int(out[0, -1].argmax())
        else:
            import numpy as np_

            with np_.load(f"{artifact}.inputs.npz") as z:
                inputs = tuple(torch.from_numpy(z[k]) for k in z.files)
            for _ in range(steps + 1):
                module.forward(inputs)
    with tempfile.TemporaryDirectory(prefix="pf-etdump-") as td:
        dump = Path(td) / "run.etdp"
        module.write_etdump_result_to_file(str(dump))
        try:
            insp = Inspector(etdump_path=str(dump),
                             etrecord=str(etrecord) if etrecord.is_file() else None)
        except Exception as e:
            raise RuntimeFailure(f"cannot read the ETDump: {e}", file=str(artifact)) from e
    blocks = [b for b in insp.event_blocks if b.name == "Execute"]
    if not blocks:
        raise RuntimeFailure("the ETDump has no Execute block", file=str(artifact))
    per_event = collections.defaultdict(float)
    calls = collections.Counter()
    for e in blocks[0].events:
        if e.perf_data is None:
            continue
        # the first calls are the probe and the prefill (generation) or a warm-up (forward)
        raw = list(e.perf_data.raw)[2 if gen else 1:] or list(e.perf_data.raw)
        per_event[e.name] += float(np.median(raw))
        calls[e.name] += 1
    step = per_event.pop("Method::execute", None)
    rows = [{"event": n, "ms_per_step": round(t, 4), "calls_per_step": calls[n]}
            for n, t in sorted(per_event.items(), key=lambda kv: -kv[1])]
    return {"artifact": str(artifact), "kind": "decode step" if gen else "inference",
            "steps": steps, "threads": threads, "step_ms": step,
            "etrecord": etrecord.name if etrecord.is_file() else None, "events": rows[:top]}


def render_profile(p: dict) -> str:
    lines = [f"{Path(p['artifact']).name}: per-operator profile, median ms per {p['kind']} over "
             f"{p['steps']} ({p['threads']} threads; whole step {p['step_ms']:.3f} ms)"]
    for r in p["events"]:
        lines.append(f"  {r['ms_per_step']:9.3f} ms  x{r['calls_per_step']:<5d} {r['event']}")
    return "\n".join(lines)
