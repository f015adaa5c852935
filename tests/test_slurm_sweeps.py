"""Sweeps on the real local SLURM cluster: the design-card grid, a preempted job that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ncsweep.nc import KEYS
from ncsweep.tracking import RunFolder
from tests.conftest import ROOT, run_cli, sacct_state

pytestmark = pytest.mark.slurm

ON_CLUSTER = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=2",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30",
              "hydra.launcher.max_num_timeout=3"]
TINY = ["logger=none", "trainer.epochs=3", "trainer.eval_every=3", "arch.width=32"]
LONG = ["logger=none", "trainer.deterministic=true", "arch.width=64", "trainer.epochs=30",
        "trainer.eval_every=2", "trainer.checkpoint_every=1", "trainer.batch_size=64"]
COMPARED = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", *KEYS)


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]


def test_design_card_sweep_on_slurm(local_slurm: str, tmp_path: Path) -> None:
    result = run_cli(["-m", "head=etf,learned", "dim=K,512", *TINY, *ON_CLUSTER, "name=card"],
                     tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = summaries(tmp_path / "multirun" / "card")
    assert {(s["head"], s["feature_dim"]) for s in runs} == {
        ("etf", 10), ("learned", 10), ("etf", 512), ("learned", 512)}
    assert all(s["status"] == "done" and s["train_acc"] > 0.3 for s in runs)
    assert "4 done" in result.stdout


def _running_job_id() -> str:
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True,
                         text=True, timeout=30).stdout.split()
    assert len(out) == 1, f"expected one running job, squeue says {out}"
    return out[0].split("_")[0]


def _wait_for_rows(root: Path, rows: int, proc: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = list(root.glob("multirun/preempt/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    pytest.fail("the SLURM job logged no metrics in time")


def test_preempted_job_is_requeued_and_resumes_to_the_same_result(local_slurm: str,
                                                                  tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    plain = run_cli(["-m", *LONG, "name=preempt"], reference, timeout=400)
    assert plain.returncode == 0, plain.stderr[-3000:]
    [expected] = [RunFolder(p.parent) for p in reference.glob("multirun/preempt/*/DONE")]

    root = tmp_path / "cluster"
    root.mkdir()
    env = {**os.environ, "WANDB_ERROR_REPORTING": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep", "-m", *LONG, *ON_CLUSTER,
                             "name=preempt"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(root, 4, proc)
    job_id = _running_job_id()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    [folder] = [RunFolder(p.parent) for p in root.glob("multirun/preempt/*/summary.json")]
    summary = folder.read_summary()
    assert summary["status"] == "done" and summary["resumed_from_epoch"] >= 1
    history = sacct_state(job_id, "--duplicates")
    assert "REQUEUED" in history or "PREEMPTED" in history, history
    rows = [{k: r[k] for k in COMPARED} for r in folder.read_metrics()]
    assert rows == [{k: r[k] for k in COMPARED} for r in expected.read_metrics()]
    assert {k: summary[k] for k in COMPARED} == {k: expected.read_summary()[k] for k in COMPARED}


SLICES = {  # a slice of each published grid, dry-run: it checks the one command, not the science
    "design_card.sh": (["seed=0", "head=etf", "dim=K"], 1),
    "ufm_landscape.sh": (["dataset.num_classes=4", "dim=K", "loss=ce", "arch.lambda_w=1e-3",
                          "arch.lambda_h=1e-3", "seed=0"], 1),
    "zhu2021_cifar10_resnet18.sh": (["head=etf", "dim=K", "seed=0"], 1),
    "zhou2022_mse_dims.sh": (["dim=9"], 1),
}


@pytest.mark.parametrize("script", sorted(SLICES))
def test_launch_scripts_run_their_grid_on_slurm(local_slurm: str, tmp_path: Path,
                                                script: str) -> None:
    overrides, jobs = SLICES[script]
    result = subprocess.run(
        [str(ROOT / "launch" / script), *overrides, "trainer.dry_run=true", "logger=none",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=1",
         "hydra.launcher.cpus_per_task=1"],
        cwd=tmp_path, text=True, capture_output=True, timeout=300,
        env={**os.environ, "NCSWEEP_SLURM_PARTITION": "local"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/summary.json")]
    assert len(runs) == jobs and all(r["status"] == "dry_run" for r in runs)
    assert all(r["params_total"] > 0 for r in runs)


def test_launch_scripts_cover_the_launch_folder() -> None:
    scripts = {p.name for p in (ROOT / "launch").glob("*.sh")
               if not p.name.startswith(("_", "local_"))}
    assert scripts == set(SLICES)
