"""Throughput of sweeps: what a run costs beside what its training costs.

Sections are independent functions, each selected by its flag (all of them without one):

``--ufm``: the UFM landscape at K = 10, d = K, CE, one sample per class, as
conf/experiment/ufm_landscape.yaml configures it (L-BFGS steps of at most 25 iterations,
history 5, 8 epochs, lambda_W = lambda_H = 5e-3). Every run is built by ``build_run`` from
conf/ and trained by ``Trainer.fit``, then probed by ``final_checks``; job handling (Hydra,
run folder, W&B) is not in these figures: it is measured apart, on ``--jobs`` real
single-start jobs (``arch.starts=1``, seeds 0, 1, ...) as one ``python -m ncsweep -m`` sweep
on the basic launcher, the sweep's wall time divided by its jobs.

1. 1,000 starts as one batched run (``arch.starts=1000``) against 1,000 single-start runs,
   whose per-run cost is measured in-process on ``--sample`` runs (seeds 0, 1, ...) of
   - ``arch.starts=null``: one start trained by torch.optim.LBFGS through the Trainer (what
     the preset ran before batched starts), and
   - ``arch.starts=1``: the batched solver with one start.
   The ratio is (1000 x per-run cost) / batched wall time in-process, and (1000 x the
   measured wall time of a job) / batched wall time as jobs. Target >= 50x.
2. The wall time of 10,000 starts in one run. Target < 60 s on the CPU.

``--packing``: 32 runs (the design-card grid x 8 seeds, 3 epochs, width 32) through the local
SLURM cluster (``SLURM_CONF`` set), one run a task against ``runs_per_task=8``, in runs per
hour of sweep wall time (target >= 2x); and ``runs_in_parallel=2`` against 1 in tasks of 16
runs on 2 CPUs (does a second lane pay?).

``--ensemble``: 32 seeds of the digits MLP as one ``trainer.ensemble=true`` sweep against the
same 32 runs solo, each sweep one ``python -m ncsweep -m`` process on the basic launcher
(``--device``, default cpu), for the default MLP and a small one; also the largest difference
of the final metrics between a member and its solo run. Target >= 5x.

``--compose``: the configs of a sweep's jobs (the design-card grid x seeds), composed by
Hydra (``load_sweep_config``, on ``--sample`` jobs) against ncsweep's composer, whose check (the
sweeper's, before anything is submitted) and load (the launcher's, in the task) derive
value-only siblings; then the check of a 10,000-job sweep.

Torch runs on ``--threads`` threads (default 1) in the ``--ufm`` section; the CLI sections
run with the CLI's defaults. Always exits 0.

Run: .venv/bin/python benchmarks/throughput.py --ufm [--sample 50] [--jobs 20] [--threads 1]
     .venv/bin/python benchmarks/throughput.py --packing --ensemble [--device cpu]
     .venv/bin/python benchmarks/throughput.py --compose [--sample 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ncsweep.app import conf_dir
from ncsweep.build import build_run
from ncsweep.config import validate

UFM_TARGET_RATIO = 50.0
UFM_TARGET_10K_S = 60.0
UFM_CELL = ("experiment=ufm_landscape", "logger=none", "trainer.progress=false",
            "dataset.num_classes=10", "dim=K", "loss=ce")


def ufm_run(starts: str, seed: int = 0) -> tuple[float, dict]:
    """One UFM run of the landscape cell, built and trained in-process: (seconds, summary)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*UFM_CELL, f"arch.starts={starts}", f"seed={seed}"])
    plain = validate(cfg)
    started = time.perf_counter()
    run = build_run(plain)
    result = run.trainer.fit(run.model, run.loss, run.optimizer, run.scheduler, run.data,
                             plain["seed"])
    summary = {**result.final, **run.final_checks(result.final)}
    return time.perf_counter() - started, summary


def ufm_section(sample: int, jobs: int) -> None:
    """Batched starts against single-start runs and jobs, and 10,000 starts in one run."""
    print("UFM landscape cell K=10 d=K ce, n=1 per class (conf/experiment/ufm_landscape.yaml)")
    batched_s, batched = ufm_run("1000")
    print(f"  1,000 starts batched: {batched_s:.2f} s, frac_reached_optimum "
          f"{batched['frac_reached_optimum']:.3f}, distinct values "
          f"{batched['distinct_objective_values']}", flush=True)
    seeds = "seed=" + ",".join(str(s) for s in range(jobs))
    job_wall, job_runs, _ = cli_sweep([*UFM_CELL, "arch.starts=1", seeds], "ufmjobs")
    assert len(job_runs) == jobs and all(r["status"] == "done" for r in job_runs)
    per_job = job_wall / jobs
    print(f"  {jobs} single-start jobs (arch.starts=1) as one CLI sweep: {job_wall:.1f} s, "
          f"{per_job:.3f} s a job; 1,000 jobs {1000 * per_job:.0f} s -> "
          f"{1000 * per_job / batched_s:.0f}x the batched run", flush=True)
    ratios = [1000 * per_job / batched_s]
    for starts, what in (("null", "torch LBFGS through the Trainer"),
                         ("1", "the batched solver, one start")):
        times, reached = [], 0
        for seed in range(sample):
            seconds, summary = ufm_run(starts, seed)
            times.append(seconds)
            reached += bool(summary.get("reached_global_optimum"))
        per_run = sum(times) / len(times)
        ratio = 1000 * per_run / batched_s
        print(f"  single start in-process, arch.starts={starts} ({what}): {per_run:.3f} s a "
              f"run (mean of {sample}; {reached}/{sample} at the optimum); 1,000 runs "
              f"{1000 * per_run:.0f} s -> {ratio:.0f}x the batched run", flush=True)
        if starts == "1":
            ratios.append(ratio)
    ten_s, ten = ufm_run("10000")
    print(f"  10,000 starts batched: {ten_s:.2f} s, frac_reached_optimum "
          f"{ten['frac_reached_optimum']:.4f}", flush=True)
    verdict = "PASS" if ratios[0] >= UFM_TARGET_RATIO and ten_s < UFM_TARGET_10K_S else "FAIL"
    print(f"{verdict}: batched / 1,000 single-start jobs {ratios[0]:.0f}x, / 1,000 "
          f"single-start runs in-process {ratios[1]:.0f}x (target >= {UFM_TARGET_RATIO:g}x); "
          f"10,000 starts in {ten_s:.1f} s (target < {UFM_TARGET_10K_S:g} s)")


PACKING_GRID = ("head=etf,learned", "dim=K,512", "seed=0,1,2,3,4,5,6,7")  # 32 runs
PACKING_RUN = ("trainer.epochs=3", "trainer.eval_every=3", "arch.width=32", "logger=none",
               "trainer.progress=false")
PACKING_CLUSTER = ("launcher=slurm", "hydra.launcher.gpus_per_node=null",
                   "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30")
PACKING_TARGET = 2.0
ENSEMBLE_SEEDS = 32
ENSEMBLE_RUN = ("logger=none", "trainer.progress=false")  # conf/trainer/default.yaml
ENSEMBLE_SIZES = (("the conf/arch/mlp.yaml MLP: width 256, d = 512", ()),
                  ("a small MLP: width 32, d = K", ("arch.width=32", "dim=K")))
ENSEMBLE_TARGET = 5.0
ENSEMBLE_COMPARED = ("train_acc", "test_acc", "train_loss", "test_loss", "nc1", "nc2_m", "nc3",
                     "nc4")


def cli_sweep(args: list[str], name: str, rerun: bool = False
              ) -> tuple[float, list[dict], str] | tuple[float, list[dict], str, float]:
    """One ``python -m ncsweep -m`` in a fresh folder: (wall seconds, summaries, stdout), and
    with ``rerun`` the wall time of the same command again there, where every job is skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        walls, outs = [], []
        for _ in range(2 if rerun else 1):
            started = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "ncsweep", "-m", *args,
                                     f"name={name}"], cwd=tmp, capture_output=True, text=True,
                                    timeout=1800,
                                    env={**os.environ, "WANDB_ERROR_REPORTING": "false"})
            walls.append(time.perf_counter() - started)
            outs.append(result.stdout)
            if result.returncode != 0:
                raise SystemExit(f"sweep {name} failed: {result.stderr[-2000:]}")
        summaries = [json.loads(p.read_text())
                     for p in sorted(Path(tmp).glob(f"multirun/{name}/*/summary.json"))]
        return (walls[0], summaries, outs[0], walls[1]) if rerun else (walls[0], summaries,
                                                                        outs[0])


def packing_section() -> None:
    """32 runs through the local SLURM cluster, one run a task against 8 (and 2 lanes)."""
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        print("packing: skipped, no cluster (eval \"$(launch/local_slurm.sh start | tail -1)\")")
        return
    print("32 runs (design-card grid x 8 seeds, 3 epochs, width 32) on the local SLURM cluster")
    cases = (("1 run a task, 1 CPU", ["hydra.launcher.cpus_per_task=1"]),
             ("8 runs a task, 1 CPU", ["hydra.launcher.cpus_per_task=1",
                                       "hydra.launcher.runs_per_task=8"]),
             ("16 runs a task, 2 CPUs, 1 at a time", ["hydra.launcher.cpus_per_task=2",
                                                      "hydra.launcher.runs_per_task=16"]),
             ("16 runs a task, 2 CPUs, 2 at a time", ["hydra.launcher.cpus_per_task=2",
                                                      "hydra.launcher.runs_per_task=16",
                                                      "hydra.launcher.runs_in_parallel=2"]))
    rates = []
    for what, extra in cases:
        wall, runs, _ = cli_sweep([*PACKING_GRID, *PACKING_RUN, *PACKING_CLUSTER, *extra],
                                  "pack")
        assert len(runs) == 32 and all(r["status"] == "done" for r in runs)
        rates.append(3600 * len(runs) / wall)
        print(f"  {what}: {wall:.1f} s, {rates[-1]:.0f} runs/hour", flush=True)
    ratio = rates[1] / rates[0]
    print(f"  runs_in_parallel=2 vs 1 on 2 CPUs: {rates[3] / rates[2]:.2f}x")
    print(f"{'PASS' if ratio >= PACKING_TARGET else 'FAIL'}: runs_per_task=8 gives "
          f"{ratio:.1f}x the runs per hour of one run a task (target >= {PACKING_TARGET:g}x)")


def ensemble_section(device: str) -> None:
    """32 seeds of the digits MLP as one batched model against 32 solo runs in one process."""
    seeds = "seed=" + ",".join(str(s) for s in range(ENSEMBLE_SEEDS))
    print(f"{ENSEMBLE_SEEDS} seeds of the digits MLP (the default trainer: Adam, batch 256, "
          f"100 epochs, 5 eval points), basic launcher, one process each, on {device}")
    ratios = []
    for what, size in ENSEMBLE_SIZES:
        common = [seeds, *ENSEMBLE_RUN, *size, f"trainer.device={device}"]
        solo_s, solo, _, skip_s = cli_sweep(common, "solo", rerun=True)
        ens_s, ens, out = cli_sweep([*common, "trainer.ensemble=true"], "ens")
        assert f"ensemble: {ENSEMBLE_SEEDS} seeds" in out
        assert {r["ensemble"] for r in ens} == {ENSEMBLE_SEEDS}
        by_seed = {r["seed"]: r for r in solo}
        worst = max(abs(r[k] - by_seed[r["seed"]][k]) for r in ens for k in ENSEMBLE_COMPARED)
        ratios.append(solo_s / ens_s)
        solo_fit = sum(r["train_time_s"] for r in solo)
        ens_fit = max(r["train_time_s"] for r in ens)
        print(f"  {what}: {ENSEMBLE_SEEDS} solo runs {solo_s:.1f} s, one ensemble "
              f"{ens_s:.1f} s -> {ratios[-1]:.1f}x; largest |ensemble - solo| of the final "
              f"{', '.join(ENSEMBLE_COMPARED)}: {worst:.1e}", flush=True)
        print(f"    the same solo sweep re-run, every job skipped: {skip_s:.1f} s (process "
              f"start, Hydra's composition and admission of {ENSEMBLE_SEEDS} jobs, which an "
              f"ensemble pays too): no ensemble of this sweep beats {solo_s / skip_s:.1f}x; "
              f"past that cost {solo_s - skip_s:.1f} s of solo work against "
              f"{ens_s - skip_s:.1f} s -> {(solo_s - skip_s) / max(ens_s - skip_s, 1e-9):.1f}x",
              flush=True)
        print(f"    training alone (train_time_s): {solo_fit:.1f} s summed over the solo runs, "
              f"{ens_fit:.1f} s batched -> {solo_fit / ens_fit:.1f}x", flush=True)
    best = max(ratios)
    print(f"{'PASS' if best >= ENSEMBLE_TARGET else 'FAIL'}: ensemble / solo runs "
          f"{', '.join(f'{r:.1f}x' for r in ratios)} (target >= {ENSEMBLE_TARGET:g}x)")


def compose_section(sample: int) -> None:
    """Hydra's composition of each job against the composer's check and load."""
    from hydra.core.utils import JobRuntime
    from hydra.types import RunMode

    from ncsweep.launcher.compose import SweepComposer
    from ncsweep.launcher.hydra_compat import config_loader

    JobRuntime.instance().set("name", "app")
    loader = config_loader(str(conf_dir()))
    master = loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)

    def jobs(count: int) -> list[list[str]]:
        return [[f"head={h}", f"dim={d}", f"seed={s}"] for s in range(count // 4)
                for h in ("etf", "learned") for d in ("K", "512")]

    print(f"job configs of the design-card grid x seeds (conf/, {sample} jobs)")
    started = time.perf_counter()
    for job in jobs(sample):
        loader.load_sweep_config(master, job)
    hydra_s = (time.perf_counter() - started) / sample
    timings = {}
    for what in ("check", "load"):
        composer = SweepComposer(loader, master)
        started = time.perf_counter()
        for job in jobs(sample):
            getattr(composer, what)(job)
        timings[what] = (time.perf_counter() - started) / sample
    print(f"  Hydra: {1e3 * hydra_s:.1f} ms a job; the composer's check "
          f"{1e3 * timings['check']:.2f} ms ({hydra_s / timings['check']:.0f}x), load "
          f"{1e3 * timings['load']:.1f} ms ({hydra_s / timings['load']:.0f}x)", flush=True)
    composer = SweepComposer(loader, master)
    started = time.perf_counter()
    for job in jobs(10_000):
        composer.check(job)
    ten = time.perf_counter() - started
    print(f"  10,000 jobs checked before launching: {ten:.1f} s (Hydra's check: "
          f"{10_000 * hydra_s / 60:.0f} min at its measured rate)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ufm", action="store_true", help="the UFM landscape section")
    parser.add_argument("--sample", type=int, default=50,
                        help="single-start runs measured per kind (--ufm)")
    parser.add_argument("--jobs", type=int, default=20,
                        help="single-start jobs timed through the CLI (--ufm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--packing", action="store_true",
                        help="runs_per_task and runs_in_parallel on the local SLURM cluster")
    parser.add_argument("--ensemble", action="store_true",
                        help="32 seeds as one batched model against 32 solo runs")
    parser.add_argument("--device", default="cpu", help="trainer.device (--ensemble)")
    parser.add_argument("--compose", action="store_true",
                        help="job configs composed by Hydra against the composer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    selected = {"ufm": args.ufm, "packing": args.packing, "ensemble": args.ensemble,
                "compose": args.compose}
    everything = not any(selected.values())
    if everything or args.ufm:
        ufm_section(args.sample, args.jobs)
    if everything or args.packing:
        packing_section()
    if everything or args.ensemble:
        ensemble_section(args.device)
    if everything or args.compose:
        compose_section(args.sample)


if __name__ == "__main__":
    main()
