"""The export stage's measured table: for each quantization, every artifact's size, export time,
parity, XNNPACK FLOP share, greedy agreement and decode speed against eager (decoders), and the
quality of the shipped file itself, scored through its runtime on a held-out split.

    python benchmarks/export_table.py --model smollm2 --quantize fp32,int8,8da4w \\
        --data ../shared/data/wikitext-2/valid.txt@0.5:1 --windows 16 --json docs/measured/export_smollm2.json
    python benchmarks/export_table.py --model smollm2 --quantize 8da4w --rounding gptq \
        --calibration ../shared/data/wikitext-2/valid.txt@0:0.5 --data ../shared/data/wikitext-2/valid.txt@0.5:1
    python benchmarks/export_table.py --model minilm --quantize fp32,int8 \\
        --data ../shared/data/stsbenchmark/sts-dev.csv --json docs/measured/export_minilm.json

Quality of the eager model is measured in the same run with the same windows/pairs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketformer.cli import _quiet_libraries  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantize", default="fp32,int8,8da4w")
    p.add_argument("--formats", help="onnx,pte (default: both; 8da4w is .pte only)")
    p.add_argument("--data", required=True, help="held-out evaluation data, PATH[@START:END]")
    p.add_argument("--windows", type=int, default=16, help="perplexity windows")
    p.add_argument("--seq-len", type=int, default=128, help="forward-graph length / ppl window")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--group-size", type=int, help="8da4w group (default: the exporter's choice)")
    p.add_argument("--rounding", default="auto", help="8da4w: rtn | gptq | auto")
    p.add_argument("--calibration", help="calibration data, PATH[@START:END] (apart from --data): "
                   "8da4w gptq rounding, int8 ONNX smoothing")
    p.add_argument("--rotation", default="auto", help="8da4w / int8 ONNX: on | off | auto")
    p.add_argument("--smoothing", type=float, default=0.5, help="int8 ONNX SmoothQuant alpha (0: off)")
    p.add_argument("--samples", type=int, default=64, help="gptq calibration samples")
    p.add_argument("--out", help="keep the artifacts here (default: a temporary directory)")
    p.add_argument("--json")
    args = p.parse_args()
    _quiet_libraries()

    from pocketformer import fsutil
    from pocketformer.data import DataSpec, load_for
    from pocketformer.evaluation import EvalOptions, artifact_forward, evaluate
    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model
    from pocketformer.versions import versions

    loaded = load_model(args.model)
    task = loaded.adapter.task
    data = load_for(loaded.adapter.data_kind, DataSpec.parse(args.data, field="--data"))
    opts = EvalOptions(seq_len=args.seq_len, max_windows=args.windows)
    eager = evaluate(loaded, task, data, opts=opts)
    print(f"eager {eager.metric}: {eager.value:.4f} ({eager.samples} samples)", flush=True)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pf_export_"))
    rows = []
    for q in [x.strip() for x in args.quantize.split(",") if x.strip()]:
        formats = ["pte"] if q == "8da4w" else ["onnx", "pte"]
        if args.formats:
            formats = [f for f in args.formats.split(",") if f in formats]
        extra = {}
        if q == "8da4w":
            extra = {"group_size": args.group_size, "rounding": args.rounding,
                     "calibration": args.calibration, "calibration_samples": args.samples,
                     "rotation": args.rotation}
        elif q == "int8":
            extra = {"calibration": args.calibration, "calibration_samples": args.samples,
                     "rotation": args.rotation, "smoothing": args.smoothing or None}
        cfg = ExportConfig(formats=formats, quantize=q, seq_len=args.seq_len, max_len=args.max_len,
                           greedy_tokens=args.greedy_tokens, **extra)
        start = time.perf_counter()
        records = export_model(loaded, out_root / q, cfg)
        total = time.perf_counter() - start
        for r in records:
            fn, o, note = artifact_forward(out_root / q / r.path, opts)
            score = evaluate(loaded, task, data, fn=fn, opts=o)
            d = r.details
            gen = d.get("generation") or {}
            row = {"artifact": r.path, "quantization": q, "size_mb": round(r.size_mb, 2),
                   "export_s": r.export_seconds, "parity_cosine": r.parity["cosine"],
                   "parity_passed": r.parity["passed"],
                   "cosine_vs_fp32": r.parity.get("cosine_vs_fp32"),
                   "greedy": (f"{r.parity['greedy_match_prefix']}/{r.parity['greedy_tokens']}"
                              if "greedy_tokens" in r.parity else None),
                   "decode_tok_s": gen.get("decode_tokens_per_s"),
                   "eager_decode_tok_s": gen.get("eager_decode_tokens_per_s"),
                   "ttft_ms": gen.get("ttft_ms"),
                   "xnnpack_flops": (d.get("delegation") or {}).get("delegated_flops_share"),
                   "quant_plan": {k: v for k, v in (d.get("quantization") or {}).items()
                                  if k in ("group_size", "quantized", "skipped", "embeddings", "lm_head",
                                           "unquantized_share", "weight_type", "per_channel",
                                           "rounding", "gptq", "rotation", "smoothing")},
                   "metric": score.metric, "value": score.value, "eager_value": eager.value,
                   "ratio_vs_eager": score.value / eager.value, "eval_note": note.get("seq_len_note")}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"{q}: {len(records)} artifacts in {total:.0f} s", flush=True)
    print()
    print("| artifact | MB | export s | parity cos | greedy = eager | decode tok/s (eager) | XNNPACK FLOPs | "
          f"{eager.metric} (x eager) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec = (f"{r['decode_tok_s']:.1f} ({r['eager_decode_tok_s']:.1f})" if r["decode_tok_s"]
               and r["eager_decode_tok_s"] else "")
        xn = f"{r['xnnpack_flops']:.2%}" if r["xnnpack_flops"] is not None else ""
        print(f"| {r['artifact']} | {r['size_mb']} | {r['export_s']:.0f} | {r['parity_cosine']:.6f} | "
              f"{r['greedy'] or ''} | {dec} | {xn} | {r['value']:.4f} ({r['ratio_vs_eager']:.3f}x) |")
    if args.json:
        fsutil.write_json(args.json, {"command": " ".join(sys.argv), "model": args.model,
                                      "eager": eager.to_dict(), "rows": rows, "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
