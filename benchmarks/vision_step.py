"""Time per training step of ResNet18 through ncsweep's loop against a bare PyTorch loop, and
the peak memory of d = 512 (learned classifier) against d = K (fixed simplex ETF).

    python benchmarks/vision_step.py                  # device=auto: CUDA where present
    python benchmarks/vision_step.py --steps 20 --repeats 7 --device cuda

Both loops train the same network (torchvision's ResNet18 with the CIFAR stem, K = 10,
batch 128, 32x32, SGD with momentum and weight decay) on random data held in memory. ncsweep's
side goes through ``data.batches`` (uint8 images normalised per batch on the device) and
``ncsweep.training.optimizer_step``; the bare side slices a float tensor and calls
forward/backward/step. The
two alternate within one process (the order flips every repeat) and the ratio is taken of
the medians. Memory is measured in a fresh process per configuration (CPU: peak RSS, which
only a new process resets cleanly; CUDA: max_memory_allocated and max_memory_reserved).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn

from ncsweep.app import conf_dir
from ncsweep.data import ImageView, Split, batches
from ncsweep.heads import ETFHead, LearnedHead
from ncsweep.losses import CrossEntropy
from ncsweep.memory import read_peak, reset_peak
from ncsweep.models import Network, ResNet
from ncsweep.training import count_parameters, optimizer_step

K = 10
SHAPE = (3, 32, 32)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def ncsweep_model(dim: int, head: str, stem: str) -> Network:
    backbone = ResNet(SHAPE, dim, "resnet18", stem=stem)
    classifier = ETFHead(K, dim) if head == "etf" else LearnedHead(K, dim)
    return Network(backbone, classifier)


def bare_model(stem: str) -> nn.Module:
    """What a user would write without ncsweep: torchvision's ResNet18, fc inside."""
    net = torchvision.models.resnet18(num_classes=K)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    n = args.batch * args.steps
    images = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, device=device)
    labels = torch.randint(K, (n,), device=device)
    declared = OmegaConf.load(conf_dir() / "dataset" / "cifar10.yaml")
    mean, std = list(declared.mean), list(declared.std)
    view = ImageView(mean, std, 3)
    split = Split(images, labels, view=view)
    floats = view(images)  # the bare loop gets its inputs ready-made

    ours = ncsweep_model(512, "learned", args.stem).to(device).train()
    ours_opt, ours_loss = sgd(ours), CrossEntropy()
    bare = bare_model(args.stem).to(device).train()
    bare_opt = sgd(bare)
    generator = torch.Generator().manual_seed(0)

    def run_ours(steps: int) -> None:
        for i, (x, y) in enumerate(batches(split, args.batch, generator, augment=True)):
            if i == steps:
                break
            optimizer_step(ours, ours_loss, ours_opt, x, y)

    def run_bare(steps: int) -> None:
        order = torch.randperm(n, device=device)
        for i in range(steps):
            idx = order[i * args.batch:(i + 1) * args.batch]
            x, y = floats[idx], labels[idx]
            bare_opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(bare(x), y)
            loss.backward()
            bare_opt.step()

    sides = {"ncsweep": run_ours, "bare": run_bare}
    for run in sides.values():
        run(args.warmup)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            sync(device)
            start = time.perf_counter()
            sides[name](args.steps)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    ratios = [a / b for a, b in zip(times["ncsweep"], times["bare"], strict=True)]
    return {
        "ncsweep_s_per_step": statistics.median(times["ncsweep"]),
        "bare_s_per_step": statistics.median(times["bare"]),
        "ratio_of_medians": statistics.median(times["ncsweep"]) / statistics.median(times["bare"]),
        "median_of_ratios": statistics.median(ratios),
        "ratios": ratios,
        "params_ncsweep": count_parameters(ours)[0], "params_bare": count_parameters(bare)[0],
    }


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_memory(dim: int, head: str, args: argparse.Namespace) -> dict:
    """One configuration, in this (fresh) process: two steps, the peak since the model."""
    device = torch.device(args.device_resolved)
    torch.manual_seed(0)
    x = torch.randn(args.batch, *SHAPE, device=device)
    y = torch.randint(K, (args.batch,), device=device)
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss()
    reset_peak(device)
    model = ncsweep_model(dim, head, args.stem).to(device).train()
    optimizer, loss = sgd(model), CrossEntropy()
    for _ in range(2):  # the second step holds the momentum buffers too
        optimizer_step(model, loss, optimizer, x, y)
    peak = read_peak(device)
    total, trainable = count_parameters(model)
    return {"dim": dim, "head": head, "params_total": total, "params_trainable": trainable,
            "peak_bytes": peak.bytes, "peak_kind": peak.kind, "baseline_bytes": base,
            "reserved_bytes": peak.reserved_bytes}


def memory_in_subprocess(dim: int, head: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device_resolved,
           "--batch", str(args.batch), "--stem", args.stem, "--measure", f"{dim}:{head}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per side")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    from ncsweep.training import resolve_device

    device = resolve_device(args.device)
    args.device_resolved = str(device)
    if args.measure:
        dim, head = args.measure.split(":")
        print(json.dumps(measure_memory(int(dim), head, args)))
        return
    gpu = device.type == "cuda"
    args.steps = args.steps or (20 if gpu else 2)
    args.repeats = args.repeats or (7 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; ResNet18 {args.stem} stem, "
          f"batch {args.batch}, {SHAPE[1]}x{SHAPE[2]}, K = {K}")
    if not args.skip_timing:
        t = time_steps(args, device)
        print(f"step time ({args.repeats} interleaved blocks of {args.steps} steps, medians): "
              f"ncsweep {t['ncsweep_s_per_step'] * 1e3:.1f} ms, bare PyTorch "
              f"{t['bare_s_per_step'] * 1e3:.1f} ms")
        print(f"ratio ncsweep/bare: {t['ratio_of_medians']:.3f}x (median of per-block ratios "
              f"{t['median_of_ratios']:.3f}x; blocks: "
              + ", ".join(f"{r:.3f}" for r in t["ratios"]) + "); target <= 1.05x")
        print(f"parameters: ncsweep {t['params_ncsweep']:,}, bare {t['params_bare']:,}")
    wide = memory_in_subprocess(512, "learned", args)
    narrow = memory_in_subprocess(K, "etf", args)
    print(f"memory ({wide['peak_kind']}, two training steps, one fresh process each):")
    for row in (wide, narrow):
        line = (f"  d = {row['dim']:>3} {row['head']:<7}: params {row['params_total']:,} "
                f"(trainable {row['params_trainable']:,}), peak {mib(row['peak_bytes'])}, "
                f"above the pre-model baseline {mib(row['peak_bytes'] - row['baseline_bytes'])}")
        if row["reserved_bytes"] is not None:
            line += f", reserved {mib(row['reserved_bytes'])}"
        print(line)
    params = 1 - narrow["params_total"] / wide["params_total"]
    peak = 1 - narrow["peak_bytes"] / wide["peak_bytes"]
    above = 1 - ((narrow["peak_bytes"] - narrow["baseline_bytes"])
                 / (wide["peak_bytes"] - wide["baseline_bytes"]))
    print(f"saving of d = K with a fixed ETF: parameters {100 * params:.1f}%, peak memory "
          f"{100 * peak:.1f}% (above baseline {100 * above:.1f}%)")


if __name__ == "__main__":
    main()
