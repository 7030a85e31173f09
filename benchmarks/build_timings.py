"""Stage timings of one `pocketformer build` (a benchmark, not a test: the machine is shared).

    .venv/bin/python benchmarks/build_timings.py examples/minilm.toml [--out DIR]

Runs the build through the installed CLI and prints wall time per stage from its report.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--out")
    a = p.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="pf-timings-")) / Path(a.recipe).stem
    cli = Path(sys.executable).parent / "pocketformer"
    start = time.perf_counter()
    proc = subprocess.run([str(cli), "build", a.recipe, "--out", str(out)])
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        return proc.returncode
    report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    print(f"\nstage timings of `pocketformer build {a.recipe}` ({report['bench'][0]['device']['cpu']}, "
          f"{report['bench'][0]['device']['logical_cores']} cores)")
    print(f"{'stage':<12} {'seconds':>8}")
    for stage, seconds in timings.items():
        print(f"{stage:<12} {seconds:>8.1f}")
    print(f"{'sum':<12} {sum(timings.values()):>8.1f}")
    print(f"{'wall (CLI)':<12} {wall:>8.1f}   (includes interpreter start-up and imports)")
    for b in report["bench"]:
        print(f"bench {b['artifact']:<22} {b['runtime']:<12} p50 {b['latency_ms']['p50']:.2f} ms  "
              f"load {b['load_ms']:.0f} ms  peak RSS {b['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
