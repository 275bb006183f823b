#!/usr/bin/env bash
# Snakemake runs this once in the freshly created env of export.yaml ($CONDA_PREFIX), from a copy in
# its conda prefix (.snakemake/conda/) and in the directory it runs in; the project is found as
# $QATFORGE_ROOT, beside this file (when run by hand) or in that directory.
set -euo pipefail
ROOT=
for d in "${QATFORGE_ROOT:-}" "$(dirname "$0")/.." "$PWD"; do
  if [ -n "$d" ] && [ -f "$d/tools/install_llama_cpp.sh" ]; then ROOT=$(cd "$d" && pwd) && break; fi
done
[ -n "$ROOT" ] || { echo "qatforge not found: run snakemake in the project directory or set QATFORGE_ROOT" >&2; exit 1; }
# qatforge itself, editable and without its dependencies (the env file pins those)
"$CONDA_PREFIX/bin/pip" install -q --no-deps -e "$ROOT"
# llama.cpp from the pinned llama-cpp-python sdist (one build per machine, cached)
"$ROOT/tools/install_llama_cpp.sh" "$CONDA_PREFIX" "$ROOT/constraints.txt"
