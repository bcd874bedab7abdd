#!/usr/bin/env bash
# Creates .venv-s3 with moto's standalone S3 server (`moto_server`) for the cluster-in-a-box tests
# (tests/box.py). A venv of its own: moto pins python-dateutil<3, which conflicts with the kubernetes
# client in .venv. Idempotent: a venv that already has this moto version is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
MOTO_VERSION=5.2.5
venv=.venv-s3
if [ -x "$venv/bin/moto_server" ] &&
    "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$MOTO_VERSION')" 2>/dev/null; then
    exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "moto[server]==$MOTO_VERSION"
echo "moto $MOTO_VERSION installed in $(pwd)/$venv"
