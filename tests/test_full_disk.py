"""A full disk during a sweep, on a real small tmpfs: one line, no temporary files, the last
good checkpoint kept, the sweep stopped with its summary line, and a re-run on a larger
filesystem that ends equal to an uninterrupted sweep."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ncsweep.nc import KEYS
from ncsweep.tracking import RunFolder
from tests.support import FAST, run_cli, run_cli_beside, small_tmpfs

# The default MLP's checkpoint is 2.7 MB: on 6 MiB the first run fits (its checkpoint and the
# next one's temporary), the second run's second checkpoint does not.
SWEEP = ["-m", *FAST, "trainer.deterministic=true", "trainer.epochs=4", "trainer.eval_every=1",
         "trainer.batch_size=64", "name=full", "seed=0,1,2,3"]
COMPARED = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", *KEYS)
HINT = "free space, then re-run the same command"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MiB tmpfs (needs root); skipped with the reason where it cannot be mounted."""
    with small_tmpfs(tmp_path, "6m") as mount_point:
        yield mount_point


def runs(root: Path) -> dict[str, RunFolder]:
    return {p.name: RunFolder(p) for p in sorted((root / "multirun" / "full").iterdir())
            if p.is_dir()}


def rows(folder: RunFolder) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in folder.read_metrics()]


def test_a_full_disk_stops_the_sweep_in_one_line_and_the_rerun_completes_it(
        small_disk: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    reference = run_cli_beside(SWEEP, elsewhere)
    full = run_cli(SWEEP, small_disk)
    assert full.returncode != 0
    stopped = [line for line in full.stderr.splitlines() if "disk full" in line]
    assert len(stopped) == 1, full.stderr
    assert "could not write the checkpoint to" in stopped[0] and str(small_disk) in stopped[0]
    assert " free there" in stopped[0] and "Traceback" not in full.stderr
    summary = [line for line in full.stdout.splitlines() if line.startswith("ncsweep: sweep ")]
    assert len(summary) == 1 and summary[0].endswith(HINT), full.stdout
    assert "1 done, 1 disk full, 2 not started" in summary[0]
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]
    folders = runs(small_disk)
    by_status = {name: f.status for name, f in folders.items()}
    assert sorted(by_status.values()) == ["done", "new", "new", "started"], by_status
    [cut] = [f for f in folders.values() if f.status == "started"]
    assert not cut.file("FAILED").exists()
    assert cut.last_attempt()["outcome"] == "disk full"
    state = torch.load(cut.file("checkpoint.pt"), map_location="cpu", weights_only=True)
    kept = [r["epoch"] for r in cut.read_metrics()]
    assert kept == sorted(set(kept)) and kept[-1] >= state["epoch"] >= 0

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rerun = run_cli(SWEEP, small_disk)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 done, 1 skipped" in rerun.stdout
    assert reference.result().returncode == 0
    resumed, uninterrupted = runs(small_disk), runs(elsewhere)
    assert sorted(resumed) == sorted(uninterrupted) and len(resumed) == 4
    for name, folder in resumed.items():
        assert folder.status == "done"
        assert rows(folder) == rows(uninterrupted[name]), name
    assert resumed[cut.path.name].read_summary()["attempts"] == 2


def test_a_sweep_on_a_disk_already_full_stops_before_its_first_file(small_disk: Path) -> None:
    """Hydra's first write of a sweep (multirun.yaml) on a full disk: one line, no traceback."""
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    result = run_cli(SWEEP, small_disk)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not started: disk full: could not write the sweep's multirun.yaml" in lines[0]
    assert lines[0].endswith(HINT) and "0 B free there" in lines[0]
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]
