"""Where a compressed tied embedding hurts a decoder: the truncated SVD of the table at a ratio,
no training, installed as the input table only, as the LM head only, or as both, with and without
exact rows for the calibration text's most frequent tokens (the `exact_share` option of `see` and
`embed-svd`, docs/see.md), and fitted in the head-input metric (their `head_metric` option): the
full d x d metric as `embed-svd` uses it, its low-rank-plus-isotropic form as `see` uses it
("rank 64"), with --input-weights mixed with the input side's metric (`input_metric`'s moment,
its probe over the logits Gaussian or, with --input-probe fisher, drawn from the softmax's Fisher
matrix; a tried and rejected design, docs/see.md), and with --kron its nearest Kronecker product M1 (x) M2 (which would let SEE's units
absorb the metric exactly; a tried and rejected design, docs/see.md). With --corrections each fit
is scored a second time with a per-token correction of V numbers on each side: as the input table
only, the approximate rows rescaled to their original norms; as the head only, a logit bias b_v
that gives each approximate row the softmax mass its exact row has over sampled calibration head
inputs h, b_v = logsumexp_h(h e_v) - logsumexp_h(h e_hat_v) (a tried and rejected design,
docs/see.md). With --table DIR the same three placements score a trained table instead: the
rows the compressed model saved in DIR (`pocketformer compress ... --out DIR`) rebuild, so the
figures say which door a trained table's perplexity comes through. With --tiers the table is
split by calibration frequency into tiers of their own rank (exact rows, low-rank tiers, the
rest), the design behind the `tier_share` option. A probe, not a test.

    .venv/bin/python benchmarks/tied_table_probe.py --model smollm2 --ratio 10 \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \
        --evaluation ../shared/data/wikitext-2/valid.txt@0.5:1 --shares 0,0.85 --metrics 0,0.5,1

Perplexity on `--windows` windows of `--seq-len` tokens of the evaluation text (the project's
`pocketformer eval` scorer); the exact rows are chosen as the methods choose them, from the token
counts of `--samples` calibration windows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketformer.cli import _quiet_libraries  # noqa: E402


def kron_metric(M, d1: int, d2: int):
    """The nearest Kronecker product M1 (x) M2 to M in Frobenius norm (Van Loan and Pitsianis,
    1993: the leading singular pair of M rearranged as a d1^2 x d2^2 matrix), symmetrised, and
    its relative error."""
    import torch

    R = M.double().reshape(d1, d2, d1, d2).permute(0, 2, 1, 3).reshape(d1 * d1, d2 * d2)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    M1, M2 = (U[:, 0] * S[0].sqrt()).reshape(d1, d1), (Vh[0] * S[0].sqrt()).reshape(d2, d2)
    if torch.trace(M1) < 0:
        M1, M2 = -M1, -M2
    M1, M2 = (M1 + M1.T) / 2, (M2 + M2.T) / 2
    err = float(torch.linalg.norm(torch.kron(M1, M2) - M.double()) / torch.linalg.norm(M.double()))
    return M1.float(), M2.float(), err


def fisher_probe(out, gen):
    """z = onehot(y) - p over each position's logits, y drawn from p = softmax(logits): E[z z^T]
    = diag(p) - p p^T, the softmax's Fisher matrix, so input_moment measures E[J^T F J], the
    second-order size of the change a row error makes to the predicted distributions."""
    import torch

    p = torch.softmax(out.detach().float(), dim=-1).reshape(-1, out.shape[-1])
    y = torch.multinomial(p.cpu(), 1, generator=gen).to(out.device)
    return (torch.zeros_like(p).scatter_(1, y, 1.0) - p).reshape(out.shape)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--calibration", required=True)
    p.add_argument("--evaluation", required=True)
    p.add_argument("--shares", default="0,0.85", help="exact_share values of the SVD fits ('' for none)")
    p.add_argument("--table", help="also score the rebuilt table of the compressed model saved here")
    p.add_argument("--metrics", default="0", help="head_metric values (0: plain rows)")
    p.add_argument("--input-weights", default="",
                   help="also fit in a mix of the two doors' metrics: for each weight w, the "
                        "head_metric's C replaced by (1 - w) C_head d / tr C_head + w C_in d / tr C_in, "
                        "C_in the input metric's moment (see's input_moment)")
    p.add_argument("--input-probe", default="gaussian", choices=["gaussian", "fisher"],
                   help="input_moment's probe over the logits")
    p.add_argument("--input-batches", type=int, default=16, help="calibration batches C_in is measured on")
    p.add_argument("--kron", action="store_true", help="also fit in the nearest Kronecker product")
    p.add_argument("--corrections", action="store_true",
                   help="also score each fit with row norms restored and a per-token logit bias")
    p.add_argument("--bias-positions", type=int, default=8192,
                   help="calibration head inputs sampled for the logit bias")
    p.add_argument("--tiers", default="",
                   help="also score frequency tiers, ';'-separated configs of 'K1:r1,K2:r2,...': the "
                        "K1 most frequent calibration tokens at rank r1 (r1 = d: exact rows), the next "
                        "K2 at rank r2, each tier its own truncated SVD, the rest one SVD at the rank "
                        "the budget leaves; fitted in the metric of the first --metrics value, tied "
                        "only (the design behind see's tier_share, docs/see.md)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--samples", type=int, default=480, help="calibration windows counted")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    _quiet_libraries()

    import torch

    from pocketformer.compress import Calibration
    from pocketformer.compress.see import (calibration_counts, exact_tokens, fitted_rows, head_inputs,
                                           head_moment, input_moment,
                                           metric_from_moment, metric_lowrank, metric_root,
                                           second_moment, svd_rank, tier_fit, weighted_svd)
    from pocketformer.models.factored import factor_dim
    from pocketformer.data import DataSpec, load_text
    from pocketformer.evaluation import EvalOptions, evaluate
    from pocketformer.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    emb, head = loaded.adapter.embeddings(model), loaded.adapter.lm_head(model)
    if not loaded.adapter.tied_head(model):
        print(f"{args.model} has no tied LM head", file=sys.stderr)
        return 2
    E = emb.weight.detach().clone()
    V, d = E.shape
    others = sum(p.numel() for p in model.parameters()) - E.numel()   # before perplexity() unties them
    calib = Calibration(load_text(DataSpec.parse(args.calibration)), seq_len=args.seq_len,
                        max_samples=args.samples)
    batches = calib.inputs(loaded)
    evaluation = load_text(DataSpec.parse(args.evaluation))
    opts = EvalOptions(seq_len=args.seq_len, max_windows=args.windows)

    def perplexity(table_in, table_out, bias=None) -> float:
        emb.weight = torch.nn.Parameter(table_in, requires_grad=False)
        head.weight = torch.nn.Parameter(table_out, requires_grad=False)
        head.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        try:
            return evaluate(loaded, "ppl", evaluation, opts=opts).value
        finally:
            head.bias = None

    betas = [float(x) for x in args.metrics.split(",")]
    H, C = None, None
    if args.corrections:         # one pass gives the states for the bias and the moment
        states = list(head_inputs(loaded, batches, "head inputs"))
        C = second_moment(states) if any(betas) else None
        gen = torch.Generator().manual_seed(0)
        H = torch.cat([h.reshape(-1, d) for h in states])
        H = H[torch.randperm(H.shape[0], generator=gen)[:args.bias_positions]]
        del states
    elif any(betas):
        C = head_moment(loaded, batches)

    weights = [float(x) for x in args.input_weights.split(",") if x]
    C_in = None
    if weights:
        C_in = input_moment(loaded, batches, seed=0, max_batches=args.input_batches,
                            probe=fisher_probe if args.input_probe == "fisher" else None)
        if C is None:
            C = head_moment(loaded, batches)

    def corrections(approx, rest):
        """Rows with their original norms; per-token logit bias matching the exact rows' mass."""
        normed = approx.clone()
        normed[rest] *= E[rest].norm(dim=1, keepdim=True) / approx[rest].norm(dim=1, keepdim=True).clamp_min(1e-8)
        bias = torch.zeros(V)
        for lo in range(0, V, 4096):
            hi = min(V, lo + 4096)
            bias[lo:hi] = (torch.logsumexp(H @ E[lo:hi].T, dim=0)
                           - torch.logsumexp(H @ approx[lo:hi].T, dim=0))
        bias[~rest] = 0
        return normed, bias

    print(f"dense: perplexity {perplexity(E, E):.2f}")
    if args.table:
        trained = load_model(args.table)
        table = trained.adapter.embeddings(trained.model)
        rest_params = (sum(p.numel() for p in trained.model.parameters())
                       - sum(p.numel() for p in table.parameters()))
        with torch.no_grad():                 # a factored table rebuilds its rows on each .weight
            T = table.weight.detach().clone()
        del table, trained
        if T.shape != E.shape or rest_params != others:
            print(f"{args.table}: not {args.model} with only its table compressed (table "
                  f"{tuple(T.shape)}, {rest_params:,} other parameters): the probe puts "
                  f"the table into {args.model} as it is", file=sys.stderr)
            return 2
        rel = float(((T - E) ** 2).sum() / (E ** 2).sum())
        print(f"| {args.table} (row rel. error {rel:.3f}) | tied | input only | head only |")
        print("|---|---|---|---|")
        print(f"| trained table | {perplexity(T, T):.1f} | {perplexity(T, E):.1f} | "
              f"{perplexity(E, T):.1f} |", flush=True)
    d1, d2 = factor_dim(d)
    shares = [float(x) for x in args.shares.split(",") if x]
    if shares:
        print("| exact_share | exact rows | calibration tokens covered | rank | head_metric | tied | input only | head only |")
        print("|---|---|---|---|---|---|---|---|")
    for share in shares:
        counts = calibration_counts(batches, V, share)
        exact = exact_tokens(counts, d, args.ratio, share)
        K = 0 if exact is None else exact.numel()
        rest = fitted_rows(V, exact)
        k = (svd_rank(V, d, args.ratio) if exact is None
             else svd_rank(V, d, args.ratio, (K + 1) * d, int(rest.sum())))
        covered = 0.0 if counts is None else float(counts[~rest].sum() / counts.sum())
        for beta in betas:
            variants = [("", torch.eye(d), torch.eye(d))]
            if beta:
                M = metric_from_moment(C, beta)
                c, W, held = metric_lowrank(M)
                variants = [("", *metric_root(M)),
                            (f" rank {W.shape[1]} ({held:.0%} of trace)", *metric_root(c * torch.eye(d) + W @ W.T))]
                for w in weights:
                    mixed = (1 - w) * C * (d / torch.trace(C)) + w * C_in * (d / torch.trace(C_in))
                    variants.append((f" mixed, input weight {w:g} ({args.input_probe})",
                                     *metric_root(metric_from_moment(mixed, beta))))
                if args.kron:
                    M1, M2, err = kron_metric(M, d1, d2)
                    (L1, L1i), (L2, L2i) = metric_root(M1), metric_root(M2)
                    variants.append((f" kron ({err:.0%} off)", torch.kron(L1, L2), torch.kron(L1i, L2i)))
            for label, L, L_inv in variants:
                P, Q = weighted_svd(E[rest] @ L, k)
                approx = E.clone()
                approx[rest] = P @ Q @ L_inv
                print(f"| {share:g} | {K} | {covered:.1%} | {k} | {beta:g}{label} | "
                      f"{perplexity(approx, approx):.1f} | {perplexity(approx, E):.1f} | "
                      f"{perplexity(E, approx):.1f} |", flush=True)
                if H is not None:
                    normed, bias = corrections(approx, rest)
                    print(f"| {share:g} | {K} | {covered:.1%} | {k} | {beta:g}{label}: input rows at "
                          f"their norms, head with bias | | {perplexity(normed, E):.1f} | "
                          f"{perplexity(E, approx, bias):.1f} |", flush=True)
    if args.tiers:
        n = calibration_counts(batches, V, 1.0)
        order = torch.sort(-n, stable=True).indices            # ties: lower token id first
        beta = betas[0]
        if beta and C is None:
            C = head_moment(loaded, batches)
        root = metric_root(metric_from_moment(C, beta)) if beta else None
        print(f"| tiers (head_metric {beta:g}) | parameters | calibration tokens in the tiers | tied |")
        print("|---|---|---|---|")
        for config in args.tiers.split(";"):
            approx, used, start, parts = E.clone(), 0, 0, []
            for K, r in (tuple(int(x) for x in t.split(":")) for t in config.split(",")):
                ids = order[start:start + K]
                start += K
                if r >= d:
                    used += (K + 1) * d
                else:
                    coef, basis = tier_fit(E[ids], r, root)
                    approx[ids] = coef @ basis
                    used += (K + 1 + d) * r
                parts.append(f"{K} at {'d' if r >= d else r}")
            ids = order[start:]
            r = int((V * d / args.ratio - used) / (ids.numel() + d))
            if r < 1:
                print(f"| {' + '.join(parts)}: over the budget |", flush=True)
                continue
            coef, basis = tier_fit(E[ids], r, root)
            approx[ids] = coef @ basis
            used += ids.numel() * r + r * d
            covered = float(n[order[:start]].sum() / n.sum())
            print(f"| {' + '.join(parts)} + rest at {r} | {used:,} ({V * d / used:.2f}x) | "
                  f"{covered:.1%} | {perplexity(approx, approx):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
