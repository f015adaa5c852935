#!/usr/bin/env bash
# Zhou et al. 2022: MSE, ResNet18 on CIFAR-10 at d in {5, 8, 9, 10, 512} (the preset's grid).
# Needs CIFAR-10 under $NCSWEEP_DATA (or dataset.root=DIR); one GPU per job.
exec "$(dirname "$0")/_sweep.sh" experiment=zhou2022_mse_dims hydra.launcher.timeout_min=720 "$@"
