"""Which linears of a decoder to keep at 8 bits in an 8da4w program (`--int8-linears`).

The model is prepared as `pocketformer export --quantize 8da4w --rounding gptq` prepares it
(rotation, then GPTQ at the export's group, the head left to `--lm-head int8`). Held-out
perplexity is then measured in eager PyTorch with the rounded weights, once with every layer
linear at 4 bits and once per projection kind (q_proj, ..., down_proj) with that kind's weights
rounded to int8 per output channel instead (and once per layer, with `--per-layer`). The
perplexity protocol is llama-perplexity's, as `pocketformer bench --llm` runs it on programs
(CTX-token chunks from position 0, the second half of each scored).

This swaps weights after one sequential GPTQ pass, so the layers after a swapped one were
calibrated on its 4-bit outputs: a ranking, not the exported program's figure. The program
exported with the chosen patterns (GPTQ then skips those linears) is what the race measures
(docs/llm_race.md). Activations stay fp32 here; the program quantizes them to int8 per token.

    .venv/bin/python benchmarks/int8_linears_sensitivity.py MODEL \\
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 \\
        --data ../shared/data/wikitext-2/valid.txt@0.5:1 [--group 192] [--ctx 128 --chunks 16]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llamacpp_perplexity(model, ids: list[int], ctx: int, chunks: int) -> float:
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        for c in range(min(chunks, len(ids) // ctx)):
            t = torch.tensor(ids[c * ctx:(c + 1) * ctx])[None]
            logp = torch.log_softmax(model(t).logits[0].double()[first:ctx - 1], -1)
            target = t[0, first + 1:ctx]
            nll -= float(logp[torch.arange(len(target)), target].sum())
            count += len(target)
    return math.exp(nll / count)


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(w / s), -127, 127) * s


def main() -> None:
    from pocketformer.data import DataSpec, load_text
    from pocketformer.export.exporters import ExportConfig, _calibration_batches, _rotated
    from pocketformer.export.gptq import gptq_round_model
    from pocketformer.export.quantize import group_for
    from pocketformer.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--data", required=True, help="held-out text, PATH[@START:END]")
    ap.add_argument("--group", type=int, help="8da4w group (default: the export's size-first choice)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    cfg = ExportConfig(formats=["pte"], quantize="8da4w", rounding="gptq", lm_head="int8",
                       calibration=args.calibration, calibration_samples=args.samples)
    ids = loaded.tokenizer(load_text(DataSpec.parse(args.data)).text, add_special_tokens=False)["input_ids"]
    ppl = lambda m: llamacpp_perplexity(m, ids, args.ctx, args.chunks)   # noqa: E731
    rows = {"fp32": ppl(loaded.model)}
    rotated, _ = _rotated(loaded, cfg, auto=True)
    group = group_for(loaded.adapter.export_module(loaded), args.group, size_first=True)
    batches, _ = _calibration_batches(rotated, cfg)
    rounded, report = gptq_round_model(rotated, batches, group, include_head=False)
    model = rounded.model
    exact = {n: m.weight.detach().clone() for n, m in rotated.model.named_modules() if isinstance(m, nn.Linear)}
    four = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and hasattr(m, "pf_rounding")}
    mods = dict(model.named_modules())

    def with_int8(keep) -> float:
        with torch.no_grad():
            for n, w in four.items():
                mods[n].weight.copy_(int8_per_channel(exact[n]) if keep(n) else w)
        return ppl(model)

    rows[f"all 4-bit (gptq, group {group})"] = with_int8(lambda n: False)
    params = {k: sum(w.numel() for n, w in four.items() if n.endswith(k)) for k in KINDS}
    total = sum(w.numel() for w in four.values())
    for kind in KINDS:
        rows[f"{kind} at int8"] = with_int8(lambda n: n.endswith("." + kind))
    if args.per_layer:
        for li in range(len(rounded.adapter.layers(model))):
            rows[f"layer {li} at int8"] = with_int8(lambda n: f"layers.{li}." in n)
    base = rows["fp32"]
    print(f"{args.model}: held-out perplexity ({args.data}, ctx {args.ctx}, {args.chunks} chunks), "
          f"GPTQ {report.seconds:.0f} s on {args.calibration}")
    print("| weights | perplexity | x fp32 | share of layer weights at int8 |")
    print("|---|---|---|---|")
    for name, value in rows.items():
        kind = name.split(" ")[0]
        share = f"{params[kind] / total:.1%}" if kind in params else ""
        print(f"| {name} | {value:.3f} | {value / base:.4f} | {share} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "group": group, "data": args.data, "ctx": args.ctx,
                       "chunks": args.chunks, "perplexity": rows,
                       "int8_share": {k: params[k] / total for k in KINDS}}, f, indent=1)


if __name__ == "__main__":
    main()
