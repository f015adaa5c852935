#!/usr/bin/env bash
# Zhu et al. 2021's claim: ResNet18 on CIFAR-10, fixed ETF vs learned head, d = K vs 512, 3 seeds.
# Needs CIFAR-10 under $NCSWEEP_DATA (or dataset.root=DIR); one GPU per job.
exec "$(dirname "$0")/_sweep.sh" experiment=zhu2021_cifar10_resnet18 head=etf,learned dim=K,512 \
  seed=0,1,2 hydra.launcher.timeout_min=720 "$@"
