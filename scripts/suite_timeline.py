"""Per worker, each test file's wall time and when it started, from a PF_TEST_TIMELINE log:

    PF_TEST_TIMELINE=/tmp/tl.tsv scripts/run_tests.sh; .venv/bin/python scripts/suite_timeline.py /tmp/tl.tsv
"""
from __future__ import annotations

import sys
from collections import defaultdict


def main(path: str) -> int:
    spans: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in open(path, encoding="utf-8"):
        worker, _event, t, nodeid = line.rstrip("\n").split("\t", 3)
        spans[(worker, nodeid.split("::")[0])].append(float(t))
    t0 = min(min(v) for v in spans.values())
    by_worker: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for (worker, file), ts in spans.items():
        by_worker[worker].append((min(ts) - t0, max(ts) - min(ts), file))
    for worker in sorted(by_worker):
        rows = sorted(by_worker[worker])
        print(f"{worker}: {sum(r[1] for r in rows):.0f} s in files, ends at {max(r[0] + r[1] for r in rows):.0f} s")
        for start, span, file in rows:
            print(f"  {start:7.0f} {span:7.0f}  {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
