"""A full disk is one line: real ENOSPC on a small tmpfs, no temporary left, the old file whole."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ncsweep.diskspace import (
    DiskFull,
    append_text,
    atomic_torch_save,
    atomic_write_text,
    free_bytes,
    guard_write,
    human_bytes,
)
from ncsweep.lease import LEASE_FILE, Lease
from tests.support import small_tmpfs


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root); skipped with the reason where it cannot be mounted."""
    with small_tmpfs(tmp_path, "1m") as mount_point:
        yield mount_point


def _fill(folder: Path, leave: int) -> None:
    """Fill the filesystem until about `leave` bytes are free."""
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free_bytes(folder) - leave))


def _assert_one_line(error: DiskFull, what: str, path: Path) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"disk full: could not write {what} to {path} (no space left")
    assert message.endswith(f"; {human_bytes(free_bytes(path.parent))} free there)")


def test_checkpoint_save_on_a_full_disk(small_fs: Path) -> None:
    path = small_fs / "checkpoint.pt"
    previous = {"epoch": 3, "w": torch.arange(10.0)}
    atomic_torch_save(previous, path, "the checkpoint")
    with pytest.raises(DiskFull) as full:
        atomic_torch_save({"epoch": 4, "w": torch.zeros(600_000)}, path, "the checkpoint")
    _assert_one_line(full.value, "the checkpoint", path)
    assert full.value.errno == errno.ENOSPC and full.value.free > 0
    assert sorted(p.name for p in small_fs.iterdir()) == ["checkpoint.pt"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], previous["w"])


def test_text_write_on_a_full_disk(small_fs: Path) -> None:
    path = small_fs / "summary.json"
    atomic_write_text(path, '{"ok": true}\n', "the summary")
    _fill(small_fs, leave=20_000)
    with pytest.raises(DiskFull) as full:
        atomic_write_text(path, "x" * 200_000, "the summary")
    _assert_one_line(full.value, "the summary", path)
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "summary.json"]
    assert path.read_text() == '{"ok": true}\n'


def test_append_on_a_full_disk_keeps_whole_lines(small_fs: Path) -> None:
    path = small_fs / "metrics.jsonl"
    rows = '{"epoch": 0}\n{"epoch": 25}\n'
    append_text(path, rows, "metrics")
    _fill(small_fs, leave=20_000)
    with pytest.raises(DiskFull) as full:
        append_text(path, '{"epoch": 50, "pad": "' + "x" * 200_000 + '"}\n', "metrics")
    _assert_one_line(full.value, "metrics", path)
    assert path.read_text() == rows
    append_text(path, '{"epoch": 50}\n', "metrics")
    assert path.read_text().splitlines()[-1] == '{"epoch": 50}'


def test_guarded_plain_write_on_a_full_disk(small_fs: Path) -> None:
    path = small_fs / "config.yaml"
    with pytest.raises(DiskFull) as full, guard_write("the run", small_fs), \
            guard_write("the resolved config", path):
        path.write_text("k: v\n" * 300_000)
    _assert_one_line(full.value, "the resolved config", path)


def test_a_lease_on_a_full_disk_is_one_line(small_fs: Path) -> None:
    _fill(small_fs, leave=0)
    with pytest.raises(DiskFull) as full:
        Lease.acquire(small_fs / "run")
    assert str(full.value).startswith(f"disk full: could not write the run's lease to "
                                      f"{small_fs / 'run' / LEASE_FILE} (")
    assert not (small_fs / "run" / LEASE_FILE).exists()


def test_other_failures_pass_through_and_keep_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1}, path, "the checkpoint")

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise ValueError("cannot pickle this")

    with pytest.raises(ValueError, match="cannot pickle this"):
        atomic_torch_save({"bad": Unpicklable()}, path, "the checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_quota_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    tmp = tmp_path / ".half.tmp"
    tmp.write_text("half")
    with pytest.raises(DiskFull, match=r"\(disk quota exceeded; .* free there\)$") as full, \
            guard_write("metrics", path, tmp):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert full.value.errno == errno.EDQUOT and not tmp.exists()
    copy = pickle.loads(pickle.dumps(full.value))
    assert str(copy) == str(full.value) and copy.free == full.value.free


def test_free_bytes_and_human_bytes(tmp_path: Path) -> None:
    assert free_bytes(tmp_path / "not" / "yet") == shutil.disk_usage(tmp_path).free
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 150 * 2**20, 3 * 2**40)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "150 MiB", "3.0 TiB"]
