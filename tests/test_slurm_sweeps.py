"""Sweeps on the real local SLURM cluster: the design-card grid, a preempted job that resumes
(and stays one W&B run, every step once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ncsweep.cluster import read_partition
from ncsweep.launcher import AUTO_DEFAULTS
from ncsweep.nc import KEYS
from ncsweep.tracking import RunFolder
from tests.support import (
    ROOT,
    folder_steps,
    get_json,
    run_cli,
    run_cli_beside,
    run_id_of,
    sacct_state,
    same_points,
    server_steps,
    wait_sacct_final,
)

pytestmark = pytest.mark.slurm

ON_CLUSTER = ["launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=2",
              "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30",
              "hydra.launcher.max_num_timeout=3", "hydra.launcher.poll_s=0.5"]
TINY = ["logger=none", "trainer.epochs=3", "trainer.eval_every=3", "arch.width=32"]
LONG = ["logger=none", "trainer.deterministic=true", "arch.width=64", "trainer.epochs=30",
        "trainer.eval_every=2", "trainer.checkpoint_every=1", "trainer.batch_size=64"]
COMPARED = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", *KEYS)


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]


def _array_ids(sweep: Path) -> list[str]:
    return [json.loads(line)["job_id"]
            for line in (sweep / ".ncsweep-jobs.jsonl").read_text().splitlines()]




def test_the_readme_cluster_command_runs_as_written(local_slurm: str, tmp_path: Path) -> None:
    result = run_cli(["-m", "head=etf,learned", "dim=K,512", "launcher=slurm"], tmp_path,
                     timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "multirun" / "default"
    runs = summaries(sweep)
    assert {(s["head"], s["feature_dim"]) for s in runs} == {
        ("etf", 10), ("learned", 10), ("etf", 512), ("learned", 512)}
    assert all(s["status"] == "done" and s["train_acc"] > 0.9 for s in runs)
    assert "4 done" in result.stdout
    [resources] = [ln for ln in result.stdout.splitlines() if "job(s) on partition" in ln]
    cpus = min(AUTO_DEFAULTS["cpus_per_task"], read_partition(None).cpus_max)
    assert "no GPU" in resources and f"each {cpus} CPU(s)" in resources, resources
    watch = [ln for ln in result.stdout.splitlines() if re.match(r"ncsweep: slurm: \d+ done", ln)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (done|running|pending|failed)", watch[-1])}
    states = wait_sacct_final(_array_ids(sweep))
    assert counts == {"done": sum(s.startswith("COMPLETED") for s in states), "running": 0,
                      "pending": 0, "failed": 0} and counts["done"] == 4, (watch, states)


def test_a_cancelled_job_ends_in_the_summary_line_and_resumes(local_slurm: str,
                                                              tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_ERROR_REPORTING": "false"}
    args = [sys.executable, "-m", "ncsweep", "-m", *LONG, *ON_CLUSTER, "name=preempt"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _wait_for_rows(tmp_path, 4, proc)
    subprocess.run(["scancel", _running_job_id(tmp_path)], check=True, timeout=30)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "UncompletedJobError" not in err, err[-3000:]
    [folder] = [RunFolder(p.parent) for p in tmp_path.glob("multirun/preempt/*/run.json")]
    [line] = [ln for ln in out.splitlines() if ln.startswith("ncsweep: sweep ")]
    assert line.endswith(": 1 interrupted"), out
    assert (f"interrupted: {folder.path}: checkpoint saved: re-run the same command to resume"
            in out)
    assert folder.last_attempt()["outcome"] == "interrupted"
    again = run_cli(args[3:], tmp_path, timeout=300)
    assert again.returncode == 0 and "1 done" in again.stdout, again.stderr[-3000:]
    summary = folder.read_summary()
    assert summary["resumed_from_epoch"] >= 1 and summary["attempts"] == 2
    for kind in ("wall", "train"):  # the cancelled attempt's time is counted too
        assert summary[f"{kind}_time_s"] > summary[f"last_attempt_{kind}_time_s"] > 0


def _running_job_id(cwd: Path) -> str:
    """The one running job submitted from ``cwd`` (the cluster may run others' jobs too)."""
    rows = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%Z"], capture_output=True,
                          text=True, timeout=30).stdout.split()
    out = [i for i, _, d in (r.partition("|") for r in rows) if Path(d) == cwd.resolve()]
    assert len(out) == 1, f"expected one running job, squeue says {rows}"
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


def test_preempted_job_is_requeued_resumes_to_the_same_result_and_is_one_online_run(
        local_slurm: str, tmp_path: Path, online: dict, wandb_server: str) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    plain = run_cli_beside(["-m", *LONG, "name=preempt"], reference, timeout=400)

    root = tmp_path / "cluster"
    root.mkdir()
    logged = [a for a in LONG if a != "logger=none"]
    env = {**os.environ, **online, "WANDB_ERROR_REPORTING": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep", "-m", *logged, *ON_CLUSTER,
                             "name=preempt"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_rows(root, 4, proc)
    job_id = _running_job_id(root)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert plain.result().returncode == 0, plain.result().stderr[-3000:]
    [expected] = [RunFolder(p.parent) for p in reference.glob("multirun/preempt/*/DONE")]
    [folder] = [RunFolder(p.parent) for p in root.glob("multirun/preempt/*/summary.json")]
    summary = folder.read_summary()
    assert summary["status"] == "done" and summary["resumed_from_epoch"] >= 1
    history = sacct_state(job_id, "--duplicates")
    assert "REQUEUED" in history or "PREEMPTED" in history, history
    rows = [{k: r[k] for k in COMPARED} for r in folder.read_metrics()]
    assert rows == [{k: r[k] for k in COMPARED} for r in expected.read_metrics()]
    assert {k: summary[k] for k in COMPARED} == {k: expected.read_summary()[k] for k in COMPARED}

    steps = folder_steps(folder, "train_loss")  # on W&B: one run, every step once
    got = server_steps(wandb_server, run_id_of(folder), "train_loss")
    assert same_points(got, steps), (got, steps)
    runs = get_json(f"{wandb_server}/api/v2/projects/default/ncsweep/runs?limit=1000")["runs"]
    assert [r["run_id"] for r in runs].count(run_id_of(folder)) == 1


SLICES = {  # a slice of each published grid, dry-run: it checks the one command, not the science
    "design_card.sh": (["seed=0", "head=etf", "dim=K"], 1),
    "ufm_landscape.sh": (["dataset.num_classes=4", "dim=K", "loss=ce", "arch.lambda_w=1e-3",
                          "arch.lambda_h=1e-3", "seed=0"], 1),
    "zhu2021_cifar10_resnet18.sh": (["head=etf", "dim=K", "seed=0"], 1),
    "zhou2022_mse_dims.sh": (["dim=9"], 1),
    # a dry run is one step on one device: one task, a batch of 2 (the 8-rank run is test_ddp's)
    "papyan2020_imagenet.sh": (["seed=0", "hydra.launcher.tasks_per_node=1",
                                "trainer.batch_size=2"], 1),
    "zhu2021_imagenet_resnet50.sh": (["head=etf", "dim=K", "hydra.launcher.tasks_per_node=1",
                                      "trainer.batch_size=2"], 1),
}


@pytest.fixture(scope="module")
def launched(local_slurm: str, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every script's slice, all at once (one CPU each): their jobs share the node."""
    folders = {script: tmp_path_factory.mktemp(script.removesuffix(".sh")) for script in SLICES}

    def launch(script: str) -> tuple[subprocess.CompletedProcess, Path]:
        cwd = folders[script]
        result = subprocess.run(
            [str(ROOT / "launch" / script), *SLICES[script][0], "trainer.dry_run=true",
             "logger=none", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=1",
             "hydra.launcher.cpus_per_task=1"],
            cwd=cwd, text=True, capture_output=True, timeout=300,
            env={**os.environ, "NCSWEEP_SLURM_PARTITION": "local"})
        return result, cwd

    with ThreadPoolExecutor(len(SLICES)) as pool:
        return dict(zip(SLICES, pool.map(launch, SLICES), strict=True))


@pytest.mark.parametrize("script", sorted(SLICES))
def test_launch_scripts_run_their_grid_on_slurm(launched: dict, script: str) -> None:
    result, cwd = launched[script]
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in cwd.glob("multirun/*/*/summary.json")]
    assert len(runs) == SLICES[script][1] and all(r["status"] == "dry_run" for r in runs)
    assert all(r["params_total"] > 0 for r in runs)


def test_launch_scripts_cover_the_launch_folder() -> None:
    scripts = {p.name for p in (ROOT / "launch").glob("*.sh")
               if not p.name.startswith(("_", "local_"))}
    assert scripts == set(SLICES)
