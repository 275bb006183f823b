#!/usr/bin/env bash
# Install the Debian packages the SLURM integration test needs (tests/test_slurm.py):
# slurmctld, slurmd, slurm-client, munge. Idempotent: does nothing when they are installed, runs
# `apt-get update` only when the package lists do not know them. Needs root (or passwordless sudo).
# Exit status 0 = installed; non-zero (with a message on stderr) = cannot install here.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch srun squeue sinfo scontrol scancel munge unmunge)

have_all() {
    local b
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
    [ -x /usr/sbin/munged ]
}

if have_all; then
    echo "install-slurm: already installed ($(slurmctld -V 2>/dev/null || echo slurm), $(munged -V 2>&1 | head -n1 || true))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: apt-get not found: install ${PACKAGES[*]} with this system's package manager" >&2
    exit 2
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-slurm: need root (or passwordless sudo) to apt-get install ${PACKAGES[*]}" >&2
        exit 3
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# update the package lists only when they do not contain the packages yet
if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
    echo "install-slurm: apt-get update"
    "${SUDO[@]}" apt-get update -q || { echo "install-slurm: apt-get update failed" >&2; exit 4; }
fi
echo "install-slurm: apt-get install ${PACKAGES[*]}"
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; then
    echo "install-slurm: apt-get install ${PACKAGES[*]} failed" >&2
    exit 5
fi
if ! have_all; then
    echo "install-slurm: packages installed but some programs are missing (${BINARIES[*]}, /usr/sbin/munged)" >&2
    exit 6
fi
echo "install-slurm: installed ($(slurmctld -V))"
