# The two commands of the README's quick start.
.PHONY: demo test setup setup-dev bench-build

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

# Compress, export, benchmark and gate the built-in default model (all-MiniLM-L6-v2).
demo: setup
	.venv/bin/pocketformer build examples/minilm.toml --out out/minilm

# The test suite (also what CI runs). pytest's "no tests collected" (exit 5) is a failure here.
test: setup-dev
	.venv/bin/python -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

# Stage timings of the MiniLM build (a benchmark, not a test).
bench-build: setup
	.venv/bin/python benchmarks/build_timings.py examples/minilm.toml
