"""The suite's own timing aid: PF_TEST_TIMELINE logs, read by scripts/suite_timeline.py."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_suite_timeline_sums_each_workers_files(tmp_path):
    log = tmp_path / "tl.tsv"
    rows = [("gw0", "start", 100.0, "tests/a.py::t1"), ("gw0", "finish", 110.0, "tests/a.py::t1"),
            ("gw0", "start", 110.0, "tests/a.py::t2"), ("gw0", "finish", 130.0, "tests/a.py::t2"),
            ("gw1", "start", 101.0, "tests/b.py::t"), ("gw1", "finish", 141.0, "tests/b.py::t")]
    log.write_text("".join(f"{w}\t{e}\t{t:.3f}\t{n}\n" for w, e, t, n in rows))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "suite_timeline.py"), str(log)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "gw0: 30 s in files, ends at 30 s"
    assert out[1].split() == ["0", "30", "tests/a.py"]
    assert out[2] == "gw1: 40 s in files, ends at 41 s"
    assert out[3].split() == ["1", "40", "tests/b.py"]


def test_conftest_writes_a_timeline_line_per_test_start_and_end(tmp_path):
    log = tmp_path / "tl.tsv"
    env = {"PF_TEST_TIMELINE": str(log), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_data.py"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    starts = [x for x in lines if x[1] == "start"]
    assert starts and len(starts) == len(lines) - len(starts)
    assert all(x[0] == "main" and x[3].startswith("tests/test_data.py::") for x in lines)
