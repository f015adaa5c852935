#!/usr/bin/env bash
# Papyan et al. 2020 on ImageNet: ResNet50, one run on the 8 GPUs of one node (8 DDP ranks,
# NCCL), 3 seeds. Needs ImageNet as an ImageFolder tree under $NCSWEEP_DATA/imagenet
# (or dataset.root=DIR). 24 h a job, requeued from its checkpoint up to 20 times.
exec "$(dirname "$0")/_sweep.sh" experiment=papyan2020_imagenet seed=0,1,2 \
  hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=8 hydra.launcher.gpus_per_node=8 \
  hydra.launcher.cpus_per_task=8 hydra.launcher.mem_gb=480 hydra.launcher.timeout_min=1440 \
  hydra.launcher.max_num_timeout=20 "$@"
