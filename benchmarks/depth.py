"""Cost of collapse through depth: an eval point with every block's metrics (``nc.layers=all``)
against the same eval point without them (``nc.layers=[]``), and with the last block only.

Run: PYTHONPATH=src .venv/bin/python benchmarks/depth.py [--repeats 41] [--resnet-repeats 7]

Two models, as ``Trainer.measure`` evaluates them (``ncsweep.training.evaluate``, one process):

- the digits MLP of conf/ (width 256, depth 2, batch norm; d = 512, K = 10) on the bundled
  digits (1,437 train, 360 test), eval batch 4,096 (conf/trainer's);
- ResNet18 (conf/'s ImageNet stem, d = 512, K = 10) on CIFAR-shaped synthetic inputs
  (3 x 32 x 32, uint8 normalised per batch), eval batch 256.

The variants alternate within one process (the order rotates every repeat). On the CPU the
clock is the process's CPU time on one thread (``--threads 1``): on a shared machine wall time
measures the other load as much as the eval point. The headline ratio is the median over
repeats of (variant / none) within the same repeat, with its quartiles: a slow spell of the
machine slows both sides of a pair, where a ratio of two minima taken at different moments
swung from 1.2x to 1.6x between runs of one build. The ratio of the fastest repeats is printed
beside it. On CUDA: wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ncsweep.data import DataBundle, ImageView, Split, load_digits
from ncsweep.heads import LearnedHead
from ncsweep.losses import CrossEntropy
from ncsweep.models import MLP, Network, ResNet
from ncsweep.nc.blocks import select_blocks
from ncsweep.training import evaluate

K = 10
D = 512
BUDGET = 512 * 2**20
SELECTIONS = ("none", "last", "all")


def digits_case(device: torch.device) -> tuple[Network, DataBundle, int]:
    """conf/'s digits MLP at d = 512 on the digits, eval batch 4,096."""
    torch.manual_seed(0)
    data = load_digits().to(device)
    model = Network(MLP(data.input_shape, D, width=256, depth=2), LearnedHead(K, D))
    return model.to(device), data, 4096


def resnet_case(device: torch.device, n_train: int, n_test: int) -> tuple[Network, DataBundle,
                                                                            int]:
    """ResNet18 at d = 512 on random CIFAR-shaped uint8 images, eval batch 256."""
    torch.manual_seed(0)
    shape = (3, 32, 32)
    view = ImageView([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], 3)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=device)
        return Split(images, torch.arange(n, device=device) % K, view=view)

    data = DataBundle("synthetic-cifar", K, shape, split(n_train), split(n_test))
    model = Network(ResNet(shape, D, "resnet18"), LearnedHead(K, D))
    return model.to(device), data, 256


def eval_point(model: nn.Module, data: DataBundle, batch: int,
               selection: str) -> Callable[[], object]:
    """One eval point with the blocks ``selection`` names (``none``: no blocks)."""
    blocks = select_blocks(model, [] if selection == "none" else selection)
    loss = CrossEntropy()
    return lambda: evaluate(model, loss, data, batch, BUDGET, blocks)


def timings(fns: dict[str, Callable[[], object]], repeats: int,
            device: torch.device) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of each function's repeats, in a rotating order after one
    warm-up."""
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def report(label: str, model: Network, data: DataBundle, batch: int, repeats: int,
           device: torch.device) -> None:
    fns = {s: eval_point(model, data, batch, s) for s in SELECTIONS}
    times = timings(fns, repeats, device)
    column = 0 if device.type == "cuda" else 1
    best = {name: min(t[column] for t in ts) for name, ts in times.items()}
    median = statistics.median(t[column] for t in times["none"])
    blocks = ", ".join(b.name for b in select_blocks(model, "all"))
    kind = "wall" if column == 0 else "CPU"
    print(f"{label} [{blocks}], {repeats} repeats: eval point without layers "
          f"{median * 1e3:.1f} ms {kind} (median); "
          + "; ".join(f"{name} {paired(times, name, column)} "
                      f"(fastest {best[name] / best['none']:.3f}x)" for name in ("all", "last")))


def paired(times: dict[str, list[tuple[float, float]]], name: str, column: int) -> str:
    """The median and quartiles over repeats of (variant / none) within the same repeat."""
    ratios = [t[column] / n[column] for t, n in zip(times[name], times["none"], strict=True)]
    low, mid, high = statistics.quantiles(ratios, n=4)
    return f"{mid:.3f}x (quartiles {low:.3f}-{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41, help="digits MLP repeats")
    parser.add_argument("--resnet-repeats", type=int, default=7)
    parser.add_argument("--resnet-train", type=int, default=512)
    parser.add_argument("--resnet-test", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("digits", "resnet18"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only in (None, "digits"):
        report("digits MLP (1,437 train, 360 test, batch 4,096)", *digits_case(device),
               args.repeats, device)
    if args.only in (None, "resnet18"):
        model, data, batch = resnet_case(device, args.resnet_train, args.resnet_test)
        report(f"ResNet18 3x32x32 ({args.resnet_train} train, {args.resnet_test} test, "
               f"batch {batch})", model, data, batch, args.resnet_repeats, device)


if __name__ == "__main__":
    main()
