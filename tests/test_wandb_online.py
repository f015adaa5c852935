"""W&B online against a real W&B-compatible server on 127.0.0.1 (openwandb, a test-only tool).

The server's own REST API (``/api/v2/runs/<id>/metrics``) is the check: wandb's ``Api()`` read
queries do not work against it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ncsweep.tracking import RunFolder
from tests.support import (
    API_KEY,
    folder_steps,
    run_cli,
    run_id_of,
    same_points,
    server_steps,
    wait_until,
)

TINY = ["trainer.epochs=4", "trainer.eval_every=2", "arch.width=32", "trainer.progress=false"]


def test_an_online_run_logs_every_eval_point(tmp_path: Path, online: dict,
                                             wandb_server: str) -> None:
    res = run_cli([*TINY, "name=online"], tmp_path, timeout=180, env=online)
    assert res.returncode == 0, res.stderr[-3000:]
    [folder] = [RunFolder(p.parent) for p in tmp_path.glob("outputs/online/*/DONE")]
    expected = folder_steps(folder, "train_loss")
    assert [s for s, _ in expected] == [0, 2, 4]
    got = server_steps(wandb_server, run_id_of(folder), "train_loss")
    assert same_points(got, expected), (got, expected)
    assert not list(folder.path.glob("wandb/offline-run-*"))


def test_an_unreachable_server_falls_back_to_offline_fast(tmp_path: Path) -> None:
    with socket.socket() as hole:  # accepts connections, never answers: a hung server
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        env = {"WANDB_MODE": "online", "WANDB_API_KEY": API_KEY,
               "WANDB_BASE_URL": f"http://127.0.0.1:{hole.getsockname()[1]}"}
        res = run_cli([*TINY, "name=unreachable"], tmp_path, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [ln for ln in res.stderr.splitlines() if "unreachable" in ln]
    assert len(warnings) == 1 and "logging offline" in warnings[0], res.stderr[-3000:]
    # the probe gave up on the silent server: wandb.init never waited on it online
    assert "timed out" in warnings[0], warnings[0]
    [folder] = [RunFolder(p.parent) for p in tmp_path.glob("outputs/unreachable/*/DONE")]
    assert list(folder.path.glob("wandb/offline-run-*"))
    assert not list(folder.path.glob("wandb/run-*"))


def test_sync_uploads_a_sweeps_offline_runs_once(tmp_path: Path, wandb_server: str) -> None:
    res = run_cli(["-m", *TINY, "seed=0,1", "name=offline"], tmp_path, timeout=240,
                  env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "offline"
    folders = [RunFolder(p.parent) for p in sorted(sweep.glob("*/DONE"))]
    assert len(folders) == 2
    env = {**os.environ, "WANDB_BASE_URL": wandb_server, "WANDB_API_KEY": API_KEY}
    command = [sys.executable, "-m", "ncsweep.sync", str(sweep)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 offline run(s) uploaded, 0 already synced" in first.stdout
    for folder in folders:
        expected = folder_steps(folder, "train_loss")
        wait_until(lambda f=folder, e=expected: same_points(
            server_steps(wandb_server, run_id_of(f), "train_loss"), e), 30,
            f"the server does not hold every train_loss point of {folder.path}", every=0.5)
    second = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert second.returncode == 0 and "0 offline run(s) uploaded, 2 already synced" in \
        second.stdout, second.stderr[-3000:]
    for folder in folders:
        steps = [s for s, _ in server_steps(wandb_server, run_id_of(folder), "train_loss")]
        assert steps == [0, 2, 4]
