#!/usr/bin/env bash
# Create .venv and install pocketformer (editable) with its pinned runtimes and built-in models.
#   scripts/setup.sh        runtime only
#   scripts/setup.sh dev    plus the test dependencies
# Idempotent: a second run only re-checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
# WordNet 3.0 (Debian's wordnet-base): the lexical knowledge SEE builds its semantic units from.
if [ ! -f /usr/share/wordnet/index.noun ] && [ -z "${WORDNET_DIR:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq wordnet-base >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && apt-get install -y -qq wordnet-base >/dev/null; }
    else
        echo "setup: WordNet is missing; run 'sudo apt-get install wordnet-base' (needed by --method see)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.pocketformer-installed${extra:+-dev}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # torch first and exactly pinned: a looser request pulls a multi-GB CUDA build here.
    .venv/bin/pip install --quiet "torch==2.13.0"
    .venv/bin/pip install --quiet -e ".${extra}"
    touch "$stamp"
fi
# Benchmark targets: native runners (host, linux-aarch64, android-arm64) from pinned registry
# packages, QEMU user mode with our instruction-count plugin, and (tests) the real adbd peer.
# apt packages they need are installed here when running as root; all of it is cached.
parts="runners qemu"
[ "${1:-}" = "dev" ] && parts="$parts adbd android llamacpp"
.venv/bin/pocketformer setup $parts
