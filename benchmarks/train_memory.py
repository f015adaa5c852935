"""The training-memory account of ResNet18 on CIFAR-10: d = 512 with a learned classifier
against d = K = 10 with a fixed simplex ETF, as the dry run records it on any device.

    python benchmarks/train_memory.py                  # the preset zhu2021_cifar10_resnet18
    python benchmarks/train_memory.py --stem imagenet --device cuda

One real training step per configuration (batch 128, 3x32x32, SGD lr 0.05, momentum 0.9,
weight decay 5e-4 over the trainable parameters, cross-entropy), on random data, counted by
``ncsweep.memory.training_step_memory``: parameters, gradients, optimiser state and the
tensors saved for backward, each storage once. Unlike a CPU peak RSS it holds nothing of
Python or torch, so the share saved is the model's own. On CUDA the allocator's peak of the
same step is printed beside it.
"""

from __future__ import annotations

import argparse
import time

import torch

from ncsweep.heads import ETFHead, LearnedHead
from ncsweep.losses import CrossEntropy
from ncsweep.memory import TrainMemory, training_step_memory
from ncsweep.models import Network, ResNet
from ncsweep.training import resolve_device

K = 10
SHAPE = (3, 32, 32)
PARTS = (("params", "params_bytes"), ("grads", "grads_bytes"),
         ("optimizer", "optimizer_bytes"), ("activations", "activations_bytes"),
         ("total", "total_bytes"))


def network(head: str, stem: str) -> Network:
    dim = 512 if head == "learned" else K
    classifier = LearnedHead(K, dim) if head == "learned" else ETFHead(K, dim)
    return Network(ResNet(SHAPE, dim, "resnet18", stem=stem), classifier)


def measure(head: str, args: argparse.Namespace, device: torch.device
            ) -> tuple[TrainMemory, float, int | None]:
    """One step of one configuration: (account, seconds, CUDA allocator peak or None)."""
    torch.manual_seed(0)
    model = network(head, args.stem).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, *SHAPE, device=device)
    y = torch.randint(K, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    memory = training_step_memory(model, CrossEntropy(), optimizer, x, y, penalty=model.penalty)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return memory, time.perf_counter() - start, peak


def mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"],
                        help="cifar: as the preset zhu2021_cifar10_resnet18 (their --SOTA runs)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    wide, wide_s, wide_peak = measure("learned", args, device)
    narrow, narrow_s, narrow_peak = measure("etf", args, device)
    print(f"device: {device}; torch {torch.__version__}; ResNet18 {args.stem} stem, batch "
          f"{args.batch}, {SHAPE[1]}x{SHAPE[2]}, K = {K}, SGD momentum 0.9, wd 5e-4; one step "
          f"each ({wide_s:.1f} s, {narrow_s:.1f} s)")
    print(f"{'MiB':<12}{'d=512 learned':>15}{'d=K ETF':>12}{'saved':>12}{'saved %':>9}")
    for name, attr in PARTS:
        a, b = getattr(wide, attr), getattr(narrow, attr)
        share = f"{100 * (1 - b / a):8.1f}%" if a else f"{'-':>9}"
        print(f"{name:<12}{mib(a):>15}{mib(b):>12}{mib(a - b):>12}{share}")
    if wide_peak is not None and narrow_peak is not None:
        print(f"{'cuda peak':<12}{mib(wide_peak):>15}{mib(narrow_peak):>12}"
              f"{mib(wide_peak - narrow_peak):>12}{100 * (1 - narrow_peak / wide_peak):8.1f}%")
    ratio = narrow.total_bytes / wide.total_bytes
    print(f"train_memory_bytes: {wide.total_bytes:,} -> {narrow.total_bytes:,} (ratio "
          f"{ratio:.4f}: d = K with a fixed ETF saves {100 * (1 - ratio):.1f}%)")


if __name__ == "__main__":
    main()
