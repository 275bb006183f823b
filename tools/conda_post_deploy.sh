#!/usr/bin/env bash
# What every conda env's envs/<env>.post-deploy.sh runs: Snakemake calls that script once in the
# freshly created env ($CONDA_PREFIX), from a copy under .snakemake/conda/, in the directory it runs
# in; the project is $QATFORGE_ROOT or that directory.
#   tools/conda_post_deploy.sh [--with-llama-cpp]
set -euo pipefail
ROOT=$(cd "${QATFORGE_ROOT:-$PWD}" && pwd)
[ -f "$ROOT/tools/install_llama_cpp.sh" ] || {
  echo "qatforge not found in $ROOT: run snakemake in the project directory or set QATFORGE_ROOT" >&2; exit 1; }
# qatforge itself, editable and without its dependencies (the env file pins those)
"$CONDA_PREFIX/bin/pip" install -q --no-deps -e "$ROOT"
if [ "${1:-}" = "--with-llama-cpp" ]; then
  # llama.cpp from the pinned llama-cpp-python sdist (one build per machine, cached)
  "$ROOT/tools/install_llama_cpp.sh" "$CONDA_PREFIX" "$ROOT/constraints.txt"
  # Go's text/template renderer that checks the Ollama Modelfile's TEMPLATE
  "$ROOT/tools/install_go_template.sh" "$CONDA_PREFIX"
fi
