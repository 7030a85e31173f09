"""How good can a whole-layer removal be on this data? A swap local search on the calibration loss
(a benchmark, not a product feature).

    .venv/bin/python benchmarks/layer_set_search.py --model smollm2 \
        --start 3,5,12,13,14,17,25,26 \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1 --minutes 40

SLEB (Song et al., 2024) removes layers greedily, one at a time, by the calibration loss; a greedy
choice can be improved by exchanging a removed layer for a kept one. This script starts from a
given set of removed layers and applies such exchanges while they lower the calibration loss
(next-token NLL, SLEB's objective, on the same calibration windows `layer_criteria.py` gives every
criterion), first improvement first, until no exchange helps or the time runs out. It then
reports the held-out perplexity of the start and the end set, on the evaluation slice the search
never sees. The point is a measured bound for the criteria table in docs/layered_pruning.md: how
far below SLEB's perplexity any selection scored on this calibration data gets, without recovery.
Given the evaluation slice as --calibration too, the search is an oracle bound (the layers chosen
on the text they are measured on), which is how the docs label that run.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from pocketformer import fsutil
from pocketformer.compress import Calibration, get_method, parse_params, run_step
from pocketformer.compress.criteria import _task_loss
from pocketformer.compress.probe import LayerProbe
from pocketformer.data import DataSpec, load_for
from pocketformer.evaluation import EvalOptions, evaluate
from pocketformer.models import load_model


class SetLoss:
    """Calibration NLL of the network without a set of layers, with the prefix shared by a
    candidate and the current set taken from one recorded trace per batch."""

    def __init__(self, loaded, batches):
        self.probe = LayerProbe(loaded)
        self.n = len(self.probe.layers)
        self.batches = batches
        self.traces = []
        self.active: list[int] = []
        self.evals = 0

    @torch.inference_mode()
    def reset(self, removed: set[int]) -> float:
        self.active = [i for i in range(self.n) if i not in removed]
        self.traces = [self.probe.trace(b, self.active) for b in self.batches]
        self.evals += 1
        total = sum(_task_loss(self.probe, t, t.final, None, None)[0] for t in self.traces)
        return total / self.tokens

    @property
    def tokens(self) -> int:
        return sum(int(t.batch[0].shape[0] * (t.batch[0].shape[1] - 1)) for t in self.traces)

    @torch.inference_mode()
    def swap(self, back: int, out: int, bound: float | None = None) -> float:
        """Loss with layer `back` restored and layer `out` removed; stops early (returning inf)
        once the partial sum already exceeds `bound` (losses are non-negative)."""
        new = sorted([i for i in self.active if i != out] + [back])
        p = next(j for j in range(len(new)) if new[j] != self.active[j])   # first changed position
        total = 0.0
        self.evals += 1
        for t in self.traces:
            # the prefix new[:p] equals the trace's: run the probe's suffix over the new stack
            hidden = self.probe.run_from(dataclasses.replace(t, active=new), t.inputs[p], p)
            total += _task_loss(self.probe, t, hidden, None, None)[0]
            if bound is not None and total / self.tokens >= bound:
                return float("inf")
        return total / self.tokens


def held_out(model: str, removed: list[int], ev, opts, task: str) -> float:
    loaded = load_model(model)
    cfg = parse_params(get_method("drop-layers"), {"layers": removed})
    run_step(loaded, "drop-layers", cfg, None)
    return evaluate(loaded, task, ev, opts=opts).value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--start", required=True, help="comma-separated layer indices removed at the start")
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-max-windows", type=int, default=32)
    p.add_argument("--minutes", type=float, default=40.0)
    p.add_argument("--json")
    a = p.parse_args()

    loaded = load_model(a.model)
    task = loaded.adapter.task
    cal = load_for(loaded.adapter.data_kind, DataSpec.parse(a.calibration))
    ev = load_for(loaded.adapter.data_kind, DataSpec.parse(a.evaluation))
    opts = EvalOptions(seq_len=a.eval_seq_len, max_windows=a.eval_max_windows)
    batches = Calibration(cal, seq_len=a.seq_len, max_samples=a.samples, batch_size=a.batch_size).inputs(loaded)
    start = sorted(int(x) for x in a.start.split(","))
    search = SetLoss(loaded, batches)
    removed = set(start)
    loss = search.reset(removed)
    first = loss
    print(f"start {start}: calibration NLL {loss:.4f} (ppl {torch.tensor(loss).exp():.2f})", flush=True)
    t0 = time.perf_counter()
    moves = []
    improved, timed_out = True, False
    while improved and not timed_out:
        improved = False
        kept = [i for i in range(search.n) if i not in removed]
        # nearest exchanges first: a removed layer for a kept neighbour is the likeliest to help
        pairs = sorted(((b, o) for b in removed for o in kept), key=lambda bo: abs(bo[0] - bo[1]))
        for back, out in pairs:
            if time.perf_counter() - t0 >= a.minutes * 60:
                timed_out = True
                break
            cand = search.swap(back, out, bound=loss)
            if cand < loss - 1e-4:
                removed = (removed - {back}) | {out}
                loss = search.reset(removed)
                moves.append({"restored": back, "removed": out, "nll": loss,
                              "seconds": round(time.perf_counter() - t0, 1)})
                print(f"  restore {back}, remove {out}: NLL {loss:.4f} (ppl {torch.tensor(loss).exp():.2f}) "
                      f"after {time.perf_counter() - t0:.0f}s, {search.evals} evaluations", flush=True)
                improved = True
                break
    seconds = time.perf_counter() - t0
    local_optimum = not timed_out
    end = sorted(removed)
    print(f"end {end}: calibration NLL {loss:.4f}; {'local optimum' if local_optimum else 'time limit'} "
          f"after {seconds:.0f}s, {search.evals} set evaluations", flush=True)
    q_start = held_out(a.model, start, ev, opts, task)
    q_end = q_start if end == start else held_out(a.model, end, ev, opts, task)
    print(f"held-out {task}: start {q_start:.2f}, end {q_end:.2f}", flush=True)
    if a.json:
        fsutil.write_json(a.json, {"args": vars(a), "start": start, "end": end, "calibration_nll_start": first,
                                   "calibration_nll_end": loss, "moves": moves, "local_optimum": local_optimum,
                                   "search_seconds": seconds, "set_evaluations": search.evals,
                                   "held_out_start": q_start, "held_out_end": q_end})
    return 0


if __name__ == "__main__":
    sys.exit(main())
