"""Many runs per task: packed SLURM array tasks, lanes, preemption of a packed task."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncsweep.nc import KEYS
from ncsweep.tracking import RunFolder
from tests.support import run_cli, run_cli_beside, sacct_state, sweep_job_ids, wait_for_rows

ON_CLUSTER = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=1",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30",
              "hydra.launcher.max_num_timeout=3"]
TINY = ["logger=none", "trainer.epochs=2", "trainer.eval_every=2", "arch.width=16",
        "trainer.progress=false"]
LONG = ["logger=none", "trainer.progress=false", "trainer.deterministic=true", "arch.width=64",
        "trainer.epochs=12", "trainer.eval_every=2", "trainer.checkpoint_every=1",
        "trainer.batch_size=64", "name=packed"]
COMPARED = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", *KEYS)


def runs(sweep: Path) -> dict[str, RunFolder]:
    return {p.parent.name: RunFolder(p.parent) for p in sweep.glob("*/run.json")}


@pytest.mark.slurm
def test_eight_runs_four_a_task_are_two_array_tasks_and_a_rerun_skips_them(
        local_slurm: str, tmp_path: Path) -> None:
    args = ["-m", "head=etf,learned", "dim=K,512", "seed=0,1", *TINY, *ON_CLUSTER,
            "hydra.launcher.runs_per_task=4", "name=packed"]
    first = run_cli(args, tmp_path, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "multirun" / "packed"
    assert "2 job(s) on partition" in first.stdout and "8 runs, up to 4 a job" in first.stdout
    assert "sweep " in first.stdout and ": 8 done" in first.stdout
    ids = sweep_job_ids(sweep)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1, ids
    deadline = time.monotonic() + 60
    states = [sacct_state(i) for i in ids]
    while not all(s.startswith("COMPLETED") for s in states) and time.monotonic() < deadline:
        time.sleep(0.5)
        states = [sacct_state(i) for i in ids]
    assert all(s.startswith("COMPLETED") for s in states), states
    folders = runs(sweep)
    assert len(folders) == 8 and all(f.status == "done" for f in folders.values())
    assert {f.read_summary()["seed"] for f in folders.values()} == {0, 1}
    again = run_cli(args, tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": 8 skipped" in again.stdout
    assert all(f.last_attempt()["outcome"] == "skipped" for f in folders.values())


def test_lanes_of_a_local_task_and_a_failing_run_that_stops_nothing(tmp_path: Path) -> None:
    result = run_cli(["-m", "head=etf", "dim=K,K-2", "seed=0,1", *TINY, "launcher=local",
                      "hydra.launcher.runs_per_task=4", "hydra.launcher.runs_in_parallel=2",
                      "hydra.launcher.cpus_per_task=2", "name=lanes"], tmp_path, timeout=300)
    assert result.returncode == 1
    sweep = tmp_path / "multirun" / "lanes"
    assert len(sweep_job_ids(sweep)) == 1
    assert ": 2 done, 2 failed" in result.stdout, result.stdout
    folders = runs(sweep)
    assert sorted(f.status for f in folders.values()) == ["done", "done", "failed", "failed"]
    for folder in folders.values():
        if folder.status == "failed":
            assert "dim='K-2' is not allowed" in folder.failure()
        else:
            assert folder.read_config()["trainer"]["cpu_threads"] == 1  # 2 CPUs, 2 lanes


@pytest.mark.slurm
def test_a_preempted_packed_task_resumes_only_its_unfinished_runs(local_slurm: str,
                                                                  tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    plain = run_cli_beside(["-m", "seed=0,1,2", *LONG], reference, timeout=400)

    root = tmp_path / "cluster"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep", "-m", "seed=0,1,2", *LONG,
                             *ON_CLUSTER, "hydra.launcher.runs_per_task=3"], cwd=root,
                            env={**os.environ, "WANDB_ERROR_REPORTING": "false"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sweep = root / "multirun" / "packed"
    wait_for_rows(proc, sweep, "*seed=1*/metrics.jsonl", 3)
    [first] = [p.name for p in sweep.glob("*seed=0*")]
    done_before = (sweep / first / "summary.json").stat().st_mtime_ns
    [job_id] = sweep_job_ids(sweep)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert ": 3 done" in out, out
    assert plain.result().returncode == 0, plain.result().stderr[-3000:]
    expected = runs(reference / "multirun" / "packed")
    history = sacct_state(job_id, "--duplicates")
    assert "REQUEUED" in history or "PREEMPTED" in history, history
    folders = runs(sweep)
    assert (sweep / first / "summary.json").stat().st_mtime_ns == done_before
    resumed = {name: f.read_summary()["resumed_from_epoch"] for name, f in folders.items()}
    second, third = (next(name for name in folders if f"seed={seed}" in name) for seed in (1, 2))
    assert resumed[first] is None and resumed[second] >= 1, resumed
    assert resumed[third] is None
    for name, folder in folders.items():
        assert ([{k: r[k] for k in COMPARED} for r in folder.read_metrics()]
                == [{k: r[k] for k in COMPARED} for r in expected[name].read_metrics()]), name
