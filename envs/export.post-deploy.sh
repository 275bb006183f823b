#!/usr/bin/env bash
# Snakemake runs this once in the freshly created env of export.yaml (see tools/conda_post_deploy.sh).
exec bash "${QATFORGE_ROOT:-$PWD}/tools/conda_post_deploy.sh" --with-llama-cpp
