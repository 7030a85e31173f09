# The two commands of the README's quick start.
.PHONY: demo test setup setup-dev bench-build

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

# Compress, export, benchmark and gate the built-in default model (all-MiniLM-L6-v2).
demo: setup
	.venv/bin/pocketformer build examples/minilm.toml --out out/minilm

# The test suite (also what CI runs): two workers, then the wall-clock-budget tests alone
# (scripts/run_tests.sh). pytest's "no tests collected" (exit 5) is a failure here.
test: setup-dev
	scripts/run_tests.sh

# Stage timings of the MiniLM build (a benchmark, not a test).
bench-build: setup
	.venv/bin/python benchmarks/build_timings.py examples/minilm.toml
