#!/usr/bin/env bash
# The test suite, as `make test` and CI run it (2 cores): every test not marked `serial` on two
# pytest-xdist workers (whole files per worker, so module fixtures are built once; longest files
# first, tests/conftest.py: LONGEST_FIRST), then the
# `serial` tests alone: they measure something a neighbour on the same cores would change (the
# QEMU instruction count's repeatability; training tests cap their steps instead, so they run in
# the parallel part). pytest's "no tests collected" (exit 5) fails here.
# PF_TEST_WORKERS overrides the worker count (1 runs everything in one process, in file order).
set -uo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
workers="${PF_TEST_WORKERS:-2}"
start=$(date +%s)
# artifacts both pytest runs build the same way are built once (tests/conftest.py: built_once)
if [ -z "${PF_TEST_CACHE:-}" ]; then
    PF_TEST_CACHE=$(mktemp -d -t pf-test-cache.XXXXXX)
    trap 'rm -rf "$PF_TEST_CACHE"' EXIT
fi
export PF_TEST_CACHE

check() {   # $1 = pytest's exit code, $2 = which part
    if [ "$1" -eq 5 ]; then echo "pytest collected no $2 tests: failing on purpose"; return 1; fi
    return "$1"
}

xdist=()
[ "$workers" -gt 1 ] && xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
"$py" -m pytest -q "${xdist[@]}" -m "not serial" --durations=40 "$@" tests
check $? "parallel" || rc=$?
"$py" -m pytest -q -m serial --durations=5 "$@" tests
check $? "serial" || rc=$?
echo "suite wall time: $(( $(date +%s) - start )) s"
exit "${rc:-0}"
