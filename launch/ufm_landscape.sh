#!/usr/bin/env bash
# The d = K landscape check on the UFM: K x d x loss x lambdas x seeds, float64 LBFGS.
exec "$(dirname "$0")/_sweep.sh" experiment=ufm_landscape hydra.launcher.gpus_per_node=null \
  hydra.launcher.cpus_per_task=2 hydra.launcher.mem_gb=8 hydra.launcher.timeout_min=60 "$@"
