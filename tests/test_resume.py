"""Interrupted runs resume from their checkpoint and end where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ncsweep.config import run_key
from ncsweep.nc import KEYS
from ncsweep.stopping import SIGNAL_AT_STEP
from ncsweep.tracking import RunFolder
from tests.support import run_cli

RUN = ["logger=none", "trainer.progress=false", "trainer.deterministic=true", "arch.width=64",
       "trainer.epochs=24", "trainer.eval_every=2", "trainer.checkpoint_every=1",
       "trainer.batch_size=64", "name=resume"]
STEPS_PER_EPOCH = 23  # the digits' 1437 train samples in batches of 64
COMPARED = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", *KEYS)


def only_run(root: Path) -> RunFolder:
    [path] = (root / "outputs" / "resume").iterdir()
    return RunFolder(path)


def rows_of(folder: RunFolder) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in folder.read_metrics()]


def uninterrupted(root: Path) -> RunFolder:
    result = run_cli(RUN, root)
    assert result.returncode == 0, result.stderr
    return only_run(root)


def start_and_interrupt(root: Path, signum: int, after_rows: int) -> int:
    """Run the CLI and have it signal itself in the epoch after its ``after_rows``-th eval
    row, at a fixed step (``NCSWEEP_SIGNAL_AT_STEP``), so no timing decides where it stops."""
    steps = 2 * (after_rows - 1) * STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2
    result = run_cli(RUN, root, env={SIGNAL_AT_STEP: f"{steps}:{signal.Signals(signum).name}"})
    rows = only_run(root).read_metrics()
    assert len(rows) == after_rows, "the run was not interrupted where it was asked to stop"
    return result.returncode


def interrupted_then_resumed(root: Path, signum: int) -> tuple[int, str, RunFolder]:
    """(exit code, outcome recorded, folder) of a run signalled after 4 eval rows, then the
    same command re-run to completion."""
    code = start_and_interrupt(root, signum, after_rows=4)
    folder = only_run(root)
    assert folder.status == "started" and not folder.file("DONE").exists()
    outcome = (folder.last_attempt() or {}).get("outcome")
    result = run_cli(RUN, root)
    assert result.returncode == 0, result.stderr
    return code, outcome, folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run and the SIGKILLed and SIGTERMed ones, resumed, side by side."""
    roots = {key: tmp_path_factory.mktemp(str(key)) for key in
             ("uninterrupted", signal.SIGKILL, signal.SIGTERM)}
    with ThreadPoolExecutor(len(roots)) as pool:
        reference = pool.submit(uninterrupted, roots["uninterrupted"])
        resumed = {signum: pool.submit(interrupted_then_resumed, roots[signum], signum)
                   for signum in (signal.SIGKILL, signal.SIGTERM)}
        return {"uninterrupted": reference.result(),
                **{signum: future.result() for signum, future in resumed.items()}}


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_uninterrupted_result(signum: int, runs: dict) -> None:
    code, outcome, folder = runs[signum]
    assert code != 0
    if signum == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        assert outcome == "interrupted"
    summary = folder.read_summary()
    assert summary["status"] == "done" and summary["resumed_from_epoch"] >= 1
    uninterrupted = runs["uninterrupted"]
    assert rows_of(folder) == rows_of(uninterrupted)
    expected = uninterrupted.read_summary()
    assert {k: summary[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    assert summary["attempts"] == 2 and expected["attempts"] == 1
    for kind in ("wall", "train"):
        total, last = summary[f"{kind}_time_s"], summary[f"last_attempt_{kind}_time_s"]
        assert total > last > 0  # the first attempt's time is counted too
        assert expected[f"{kind}_time_s"] == expected[f"last_attempt_{kind}_time_s"]


def test_resume_must_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli([*RUN, "trainer.resume=must"], tmp_path)
    assert result.returncode == 1
    assert "trainer.resume=must but" in result.stderr and "checkpoint.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_corrupt_checkpoint_fails_clearly_and_a_rerun_fixes_only_that_job(
        tmp_path: Path) -> None:
    sweep = ["-m", "logger=none", "trainer.progress=false", "arch.width=32", "trainer.epochs=2",
             "name=fix", "seed=0,1"]
    root = tmp_path / "multirun" / "fix"
    good = root / run_key("arch.width=32,seed=0,trainer.epochs=2")
    bad = RunFolder(root / run_key("arch.width=32,seed=1,trainer.epochs=2"))
    bad.path.mkdir(parents=True)
    bad.file("checkpoint.pt").write_bytes(b"not a checkpoint")
    first = run_cli(sweep, tmp_path)
    assert first.returncode == 1
    assert "1 done, 1 failed" in first.stdout and f"failed: {bad.path}" in first.stdout
    assert bad.status == "failed" and "cannot be read" in bad.failure()
    assert "trainer.resume=never" in bad.failure()
    good_mtime = (good / "summary.json").stat().st_mtime_ns
    bad.file("checkpoint.pt").unlink()
    second = run_cli(sweep, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "1 done, 1 skipped" in second.stdout
    assert (good / "summary.json").stat().st_mtime_ns == good_mtime
    assert bad.status == "done" and bad.read_summary()["status"] == "done"


def test_a_requeue_that_dies_still_ends_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """The launcher's requeue command killed by the job step's end (as SLURM does when it
    requeues): the task still exits, so a packed task never starts its next run."""
    from ncsweep.stopping import StopFlag

    def requeue(signum: int, frame: object) -> None:
        subprocess.check_call([sys.executable, "-c",
                               "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        stop = StopFlag()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop()
        with pytest.raises(SystemExit) as exit_info:
            stop.hand_over()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exit_info.value.code == 128 + signal.SIGUSR2
    [warning] = [r.getMessage() for r in caplog.records if "requeue" in r.getMessage()]
    assert "CalledProcessError" in warning and "re-run the same command" in warning
