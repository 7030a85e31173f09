"""Where a compressed tied embedding hurts a decoder: the truncated SVD of the table at a ratio,
no training, installed as the input table only, as the LM head only, or as both, with and without
exact rows for the calibration text's most frequent tokens (the `exact_share` option of `see` and
`embed-svd`, docs/see.md). A probe, not a test.

    .venv/bin/python benchmarks/tied_table_probe.py --model smollm2 --ratio 10 \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1 --shares 0,0.85

Perplexity on `--windows` windows of `--seq-len` tokens of the evaluation text.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketformer.cli import _quiet_libraries  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--shares", default="0,0.85")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    _quiet_libraries()

    import torch
    import torch.nn.functional as F

    from pocketformer.compress.see import weighted_svd
    from pocketformer.data import DataSpec, load_text
    from pocketformer.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    emb, head = loaded.adapter.embeddings(model), loaded.adapter.lm_head(model)
    if head is None or not loaded.adapter.tied_head(model):
        print(f"{args.model} has no tied LM head", file=sys.stderr)
        return 2
    E = emb.weight.detach().clone()
    V, d = E.shape
    counts = torch.bincount(tok(load_text(DataSpec.parse(args.calibration)).text,
                                return_tensors="pt").input_ids[0], minlength=V).float()
    ids = tok(load_text(DataSpec.parse(args.evaluation)).text, return_tensors="pt").input_ids[0]
    T = args.seq_len
    windows = torch.stack([ids[i * T:(i + 1) * T] for i in range(min(args.windows, len(ids) // T))])

    def perplexity(table_in, table_out) -> float:
        emb.weight = torch.nn.Parameter(table_in, requires_grad=False)
        head.weight = torch.nn.Parameter(table_out, requires_grad=False)
        nll, n = 0.0, 0
        with torch.inference_mode():
            for batch in windows.split(4):
                logits = model(input_ids=batch).logits[:, :-1]
                nll += F.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1), reduction="sum").item()
                n += batch[:, 1:].numel()
        return math.exp(nll / n)

    print(f"dense: perplexity {perplexity(E, E):.2f}")
    order = torch.sort(-counts, stable=True).indices
    budget = V * d / args.ratio
    print("| exact_share | exact rows | calibration tokens covered | rank | tied | input only | head only |")
    print("|---|---|---|---|---|---|---|")
    for share in [float(x) for x in args.shares.split(",")]:
        K = min(int(share * V / args.ratio), int((counts > 0).sum()))
        reserved = (K + 1) * d if K else 0
        k = int((budget - reserved) / (V + d))
        rest = torch.ones(V, dtype=torch.bool)
        rest[order[:K]] = False
        P, Q = weighted_svd(E[rest], k)
        approx = E.clone()
        approx[rest] = P @ Q
        covered = float(counts[~rest].sum() / counts.sum())
        print(f"| {share:g} | {K} | {covered:.1%} | {k} | {perplexity(approx, approx):.1f} | "
              f"{perplexity(approx, E):.1f} | {perplexity(E, approx):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
