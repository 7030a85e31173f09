"""XNNPACK delegation share (of FLOPs) of the .pte for MiniLM and the digits ViT, dense and pruned
(docs/export.md). Inputs are local build outputs: a layered-prune MiniLM build
(`pocketformer build examples/minilm_layered.toml --out OUT`, its OUT/model), the digits ViT
(`python examples/vit_digits.py OUT`) and a ViT with one layer removed
(`pocketformer compress --model VIT --method layered-prune --remove-layers 1 --calibration
VIT/../calibration.npz --recovery none --out VITP`).

    python benchmarks/delegation_table.py MINILM_PRUNED VIT VITP [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("minilm_pruned")
    p.add_argument("vit")
    p.add_argument("vit_pruned")
    p.add_argument("--out", default="delegation_out")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for label, src, q in [("MiniLM dense", "minilm", "fp32"), ("MiniLM pruned", args.minilm_pruned, "fp32"),
                          ("MiniLM dense", "minilm", "8da4w"), ("ViT digits dense", args.vit, "fp32"),
                          ("ViT digits pruned", args.vit_pruned, "fp32")]:
        loaded = load_model(src)
        out = Path(args.out) / label.replace(" ", "_") / q
        (rec,) = export_model(loaded, out, ExportConfig(formats=["pte"], quantize=q, etrecord=False,
                                                        min_delegated_flops=None))
        d = rec.details["delegation"]
        row = {"model": label, "quantize": q, "mb": round(rec.size_mb, 2),
               "flops_share": d["delegated_flops_share"], "partitions": d.get("partitions"),
               "portable_ops": sorted(d.get("portable_ops", {}))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
