#!/usr/bin/env bash
# Shared by the launch/*.sh sweeps: run a grid on SLURM with ncsweep's Python.
# Partition, account and QoS come from NCSWEEP_SLURM_PARTITION, NCSWEEP_SLURM_ACCOUNT and
# NCSWEEP_SLURM_QOS; extra arguments are passed on (e.g. seed=0,1,2 hydra.launcher.timeout_min=600).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${NCSWEEP_PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
if ! command -v sbatch >/dev/null 2>&1; then
  echo "launch: sbatch not found: run on a SLURM login node, or start launch/local_slurm.sh" >&2
  exit 2
fi
exec "$python" -m ncsweep -m launcher=slurm "$@"
