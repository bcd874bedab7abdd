#!/usr/bin/env bash
# Writes constraints.txt (the exact versions that tools/setup.sh and CI install) from a venv whose tests
# pass: by default .venv-latest, made by `bash tools/setup.sh --latest` (docs/dependencies.md).
# Left out: fulcrum itself, and torch with its CUDA parts (nvidia-*, triton): setup.sh pins torch on its
# own, and a CPU install has no CUDA parts while a GPU one needs the ones its torch wheel names.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-latest}
[ -x "$venv/bin/python" ] || { echo "no venv at $venv: run 'bash tools/setup.sh --latest' first" >&2; exit 1; }
frozen=$("$venv/bin/python" -m pip freeze --exclude-editable)
if grep -E ' @ |^-e ' <<<"$frozen" >&2; then
    echo "these are installed from a path or URL, not from an index: a constraints file cannot pin them" >&2
    exit 1
fi
tmp=$(mktemp constraints.txt.XXXXXX)
trap 'rm -f "$tmp"' EXIT
{
    echo "# The versions fulcrum is tested with. Written by tools/lock.sh from $venv; do not edit by hand."
    echo "# tools/setup.sh installs with 'pip install -c constraints.txt'; docs/dependencies.md says more."
    grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|fulcrum)==' <<<"$frozen" | grep -v '^#'
} >"$tmp"
mv "$tmp" constraints.txt  # atomic: a failed run leaves the old file
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages) from $venv"
