#!/usr/bin/env bash
# Zhu et al. 2021's d = K claim on ImageNet: ResNet50, fixed ETF vs learned head, d = K vs
# 2048, one run on the 8 GPUs of one node (8 DDP ranks, NCCL). Needs ImageNet as an
# ImageFolder tree under $NCSWEEP_DATA/imagenet (or dataset.root=DIR).
exec "$(dirname "$0")/_sweep.sh" experiment=zhu2021_imagenet_resnet50 head=etf,learned \
  dim=K,2048 seed=0 hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=8 \
  hydra.launcher.gpus_per_node=8 hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=480 \
  hydra.launcher.timeout_min=1440 hydra.launcher.max_num_timeout=20 "$@"
