"""The real CLI in a subprocess: the design-card sweep, launchers, bad input, the W&B mirror."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ncsweep.report.wandb_log import read_wandb_offline
from ncsweep.tracking import RunFolder
from tests.support import run_cli

TINY = ["trainer.epochs=3", "trainer.eval_every=3", "arch.width=32", "trainer.progress=false"]
GRID = ["head=etf,learned", "dim=K,512"]
JOBS = {("etf", 10), ("learned", 10), ("etf", 512), ("learned", 512)}


def sweep_runs(root: Path, name: str) -> dict[str, dict]:
    folders = [p for p in (root / "multirun" / name).iterdir() if (p / "summary.json").exists()]
    return {p.name: json.loads((p / "summary.json").read_text()) for p in folders}


def test_design_card_sweep_basic_launcher_then_skips_everything(tmp_path: Path) -> None:
    args = ["-m", *GRID, *TINY, "logger=none", "name=card"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    runs = sweep_runs(tmp_path, "card")
    assert len(runs) == 4 and {(s["head"], s["feature_dim"]) for s in runs.values()} == JOBS
    assert all(s["status"] == "done" and s["train_acc"] > 0.3 for s in runs.values())
    assert "4 done" in first.stdout and str(tmp_path / "multirun" / "card") in first.stdout
    # the sweep ends with the answer: one seed a side settles nothing, and says what would
    assert re.search(r": accuracy inconclusive .*(about \d+|more than 100) seeds a side",
                     first.stdout), first.stdout[-3000:]
    report = tmp_path / "multirun" / "card" / "report"
    assert f"report written to {report / 'report.md'}" in first.stdout
    assert (report / "verdicts.csv").is_file() and (report / "report.md").is_file()
    second = run_cli(args, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "4 skipped" in second.stdout and "already done, skipped" in second.stdout
    assert sweep_runs(tmp_path, "card") == runs


def test_design_card_sweep_through_submitit_local(tmp_path: Path) -> None:
    result = run_cli(["-m", *GRID, *TINY, "logger=none", "name=local", "launcher=local"],
                     tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    runs = sweep_runs(tmp_path, "local")
    assert {(s["head"], s["feature_dim"]) for s in runs.values()} == JOBS
    assert all(s["status"] == "done" for s in runs.values())
    assert list((tmp_path / "multirun" / "local" / ".submitit").iterdir())


def test_a_broken_job_fails_alone_and_the_sweep_says_so(tmp_path: Path) -> None:
    args = ["-m", "head=etf", "dim=K,K-2", *TINY, "logger=none", "name=broken"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 1
    assert "1 done, 1 failed" in result.stdout
    [bad_dir] = (tmp_path / "multirun" / "broken").glob("*dim=K-2,head=etf*")
    bad = RunFolder(bad_dir)
    assert bad.status == "failed" and not bad.file("DONE").exists()
    assert "dim='K-2' is not allowed" in bad.failure()
    assert "ncsweep: error: dim='K-2' is not allowed: with head=etf, d >= K-1 = 9" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["head=fixed"], "ncsweep: error: head='fixed' is not allowed: one of etf, learned"),
    (["dim=0"], "ncsweep: error: dim='0' is not allowed: a positive integer"),
    (["dim=abc"], "ncsweep: error: dim='abc' is not allowed: a positive integer"),
    (["head=etf", "dim=5"], "ncsweep: error: dim=5 is not allowed: with head=etf, d >= K-1 = 9"),
    (["optim.lr=-1"], "ncsweep: error: optim.lr=-1 is not allowed: a number > 0"),
    (["trainer.epochs=-2"], "ncsweep: error: trainer.epochs=-2 is not allowed: a number >= 0"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli([*args, "logger=none"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/DONE")) and not list(tmp_path.glob("**/summary.json"))


def test_cfg_hydra_shows_and_a_sweep_with_cfg_is_one_line(tmp_path: Path) -> None:
    shown = run_cli(["--cfg", "hydra"], tmp_path, timeout=60)
    assert shown.returncode == 0 and "sweep_report" in shown.stdout, shown.stderr
    both = run_cli(["-m", "dim=K,512", "--cfg", "job"], tmp_path, timeout=60)
    assert both.returncode == 2 and both.stderr.strip() == (
        "ncsweep: error: -m and --cfg do not go together: choose one (-m runs a sweep, "
        "--cfg job shows one job's config)")


def test_cfg_job_shows_the_resolved_dim(tmp_path: Path) -> None:
    result = run_cli(["dim=K", "--cfg", "job"], tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "feature_dim: 10" in result.stdout and "dim: K" in result.stdout


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path: Path) -> None:
    result = run_cli([*TINY, "trainer.eval_every=1", "name=wb"], tmp_path, timeout=200)
    assert result.returncode == 0, result.stderr
    [run_dir] = (tmp_path / "outputs" / "wb").iterdir()
    folder = RunFolder(run_dir)
    rows, summary = folder.read_metrics(), folder.read_summary()
    mirror = read_wandb_offline(folder.path)
    assert [r["epoch"] for r in mirror["history"]] == [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for mine, theirs in zip(rows, mirror["history"], strict=True):
        for key in ("nc1", "nc3", "train_acc", "test_loss"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-12)
    assert mirror["config"]["feature_dim"] == 512
    assert mirror["summary"]["nc1"] == pytest.approx(summary["nc1"], rel=1e-12)
    assert mirror["exit_code"] == 0
