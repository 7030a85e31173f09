"""Where a compressed decoder's held-out perplexity gap sits, position by position: the dense
model and a compressed one saved by `pocketformer compress ... --out DIR` (a table with exact
rows, `see`'s or `embed-svd`'s `exact_share`) score the same windows of the evaluation text, and
each position's loss gap (compressed NLL minus dense NLL, in nats) is split by whether its input
token and its target token have exact rows in DIR. Also printed: the softmax mass each model
puts on the tokens without exact rows, and how much of the evaluation text's tokens an exact set
of the same size would cover if it were chosen by other counts of the calibration text: the
hard counts (what `exact_share` uses), the dense model's expected counts (the sum of its
predicted distributions over the calibration positions), and their sum. A probe, not a test.

    .venv/bin/python benchmarks/see_gap.py --model smollm2 --compressed DIR \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1
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
    p.add_argument("--compressed", required=True, help="a compressed model's directory")
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--samples", type=int, default=480, help="calibration windows counted")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    _quiet_libraries()

    import torch

    from pocketformer.compress import Calibration
    from pocketformer.compress.see import token_counts, token_mask
    from pocketformer.data import DataSpec, load_text
    from pocketformer.models import load_model
    from pocketformer.models.factored import ExactRows

    torch.set_num_threads(args.threads)
    dense, small = load_model(args.model), load_model(args.compressed)
    table = small.adapter.embeddings(small.model)
    if not isinstance(table, ExactRows):
        print(f"{args.compressed}: its table has no exact rows (exact_share 0); nothing to split by",
              file=sys.stderr)
        return 2
    V = table.num_embeddings
    exact = table.slot < table.rows_kept
    K = int(exact.sum())

    ids = dense.adapter.token_ids(dense, load_text(DataSpec.parse(args.evaluation)).text)
    n = min(args.windows, len(ids) // args.seq_len)
    windows = ids[: n * args.seq_len].view(n, args.seq_len)
    gaps, inp, tgt, mass_d, mass_s = [], [], [], [], []
    with torch.no_grad():
        for w in windows.split(2):
            ld = torch.log_softmax(dense.model(input_ids=w).logits[:, :-1].float(), -1)
            ls = torch.log_softmax(small.model(input_ids=w).logits[:, :-1].float(), -1)
            t = w[:, 1:].unsqueeze(-1)
            gaps.append((ld.gather(-1, t) - ls.gather(-1, t)).reshape(-1))
            inp.append(exact[w[:, :-1]].reshape(-1))
            tgt.append(exact[w[:, 1:]].reshape(-1))
            mass_d.append(ld[..., ~exact].exp().sum(-1).reshape(-1))
            mass_s.append(ls[..., ~exact].exp().sum(-1).reshape(-1))
    gap, inp, tgt = torch.cat(gaps).double(), torch.cat(inp), torch.cat(tgt)
    N = gap.numel()
    print(f"{args.compressed}: {K:,} exact rows of {V:,}; {N:,} held-out positions; mean gap "
          f"{gap.mean():.3f} nats (perplexity ratio {math.exp(gap.mean()):.2f}x)")
    print("| input token | target token | share of positions | mean gap (nats) | share of the total gap |")
    print("|---|---|---|---|---|")
    for i_name, i_mask in (("exact", inp), ("approximate", ~inp)):
        for t_name, t_mask in (("exact", tgt), ("approximate", ~tgt)):
            m = i_mask & t_mask
            share = float(m.double().mean())
            mean = float(gap[m].mean()) if m.any() else float("nan")
            print(f"| {i_name} | {t_name} | {share:.1%} | {mean:.3f} | {float(gap[m].sum() / gap.sum()):.1%} |")
    print(f"softmax mass on the tokens without exact rows: dense {torch.cat(mass_d).mean():.3f}, "
          f"compressed {torch.cat(mass_s).mean():.3f} (their share of the targets: {float((~tgt).double().mean()):.3f})")

    calib = Calibration(load_text(DataSpec.parse(args.calibration)), seq_len=args.seq_len,
                        max_samples=args.samples)
    batches = calib.inputs(dense)
    hard = token_counts(batches, V).double()
    soft = torch.zeros(V, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            mask = token_mask(b)
            out = dense.model(input_ids=b[0]).logits.float()
            soft += torch.softmax(out[mask], -1).sum(0).double()
    held = torch.bincount(windows[:, 1:].reshape(-1), minlength=V).double()
    print("| exact set of the same size chosen by | evaluation targets covered |")
    print("|---|---|")
    print(f"| this model's exact rows | {float(held[exact].sum() / held.sum()):.2%} |")
    for name, c in (("calibration counts", hard), ("dense model's expected counts", soft),
                    ("their sum", hard + soft)):
        order = torch.sort(-c, stable=True).indices[:K]
        print(f"| {name} | {float(held[order].sum() / held.sum()):.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
