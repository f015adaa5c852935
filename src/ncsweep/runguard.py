"""A run's guards against other writers and a full disk, at the level of the job and the sweep.

The lease (ncsweep.lease) is held by rank 0 for a whole attempt; a full disk (DiskFull) stops
the sweep from starting further runs on the same filesystem in this process. What cannot be
written into a folder (a held run is not ours; a full disk may refuse even a small file) is
noted here in memory for the end-of-sweep summary.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ncsweep import distributed
from ncsweep.diskspace import DiskFull, atomic_write_text, full_errno
from ncsweep.lease import HEARTBEAT_S, STALE_AFTER_S, Lease, RunHeld
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)

RUNNING_ELSEWHERE = "running elsewhere"
DISK_FULL = "disk full"
NOT_STARTED = "not started"
HYDRA_SUBDIR = ".hydra"
RERUN_HINT = "free space, then re-run the same command"


@dataclass(frozen=True)
class Noted:
    """An outcome kept in memory: the run folder, what happened, its one line, and when."""

    folder: str
    outcome: str
    detail: str
    time: float


_NOTED: list[Noted] = []
_FULL: dict[int, DiskFull] = {}


def note(folder: Path | str, outcome: str, detail: str) -> None:
    """Keep an outcome for this process's end-of-sweep summary."""
    _NOTED.append(Noted(str(Path(folder).resolve()), outcome, detail, time.time()))


def noted(since: float) -> list[Noted]:
    """The outcomes noted in this process since `since` (a sweep's start)."""
    return [n for n in _NOTED if n.time >= since]


def _device(path: Path) -> int | None:
    """The filesystem (st_dev) that holds `path` or its nearest existing parent."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.stat(probe).st_dev
    except OSError:
        return None


def stop_on(err: DiskFull) -> None:
    """No further run on the full filesystem starts in this process (this sweep)."""
    device = _device(err.path)
    if device is not None:
        _FULL.setdefault(device, err)


def full_disk_at(path: Path | str) -> DiskFull | None:
    """The full disk that stopped this sweep where `path` would be written, or None."""
    device = _device(Path(path))
    return None if device is None else _FULL.get(device)


class LeaseLost(RuntimeError):
    """The run's lease was taken over while it trained (it stalled past the stale timeout):
    it stops writing, since the folder is another process's now."""


def as_disk_full(err: BaseException, where: Path) -> DiskFull | None:
    """The error as a DiskFull when a full disk or quota caused it (a write not guarded by
    ncsweep.diskspace included), else None."""
    if isinstance(err, DiskFull):
        return err
    code = full_errno(err)
    if code is None:
        return None
    cause = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno == code):
        cause = cause.__cause__ or cause.__context__
    filename = getattr(cause, "filename", None)
    return DiskFull("a file of the run", Path(filename) if filename else where, code)


def lease_timing(cfg: Any) -> tuple[float, float]:
    """(heartbeat_s, stale_after_s) from the config's ``lease`` node, else the defaults."""
    heartbeat = OmegaConf.select(cfg, "lease.heartbeat_s", default=HEARTBEAT_S)
    stale = OmegaConf.select(cfg, "lease.stale_after_s", default=STALE_AFTER_S)
    return float(heartbeat), float(stale)


def hold(folder: RunFolder, cfg: Any) -> Lease | RunHeld | None:
    """Rank 0 takes the folder's lease; RunHeld (on every rank) when a live holder has it.

    Other ranks hold nothing (None): rank 0 writes the folder for them all.
    """
    lease: Lease | None = None
    held: RunHeld | None = None
    if folder.writer:
        heartbeat, stale = lease_timing(cfg)
        try:
            lease = Lease.acquire(folder.path, heartbeat_s=heartbeat, stale_after_s=stale)
        except RunHeld as err:
            held = err
    held = distributed.broadcast_object(held)
    return held if held is not None else lease


def write_hydra_files(folder: RunFolder, task_cfg: Any, hydra_cfg: Any) -> None:
    """Hydra's own record of the job (.hydra/config.yaml, hydra.yaml, overrides.yaml).

    Written here, under the lease and through the full-disk guard, in place of Hydra's own
    write (conf/config.yaml sets ``hydra.output_subdir`` to null), so a full disk is one line.
    """
    if not folder.writer:
        return
    target = folder.path / HYDRA_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": task_cfg, "hydra.yaml": hydra_cfg,
             "overrides.yaml": hydra_cfg.hydra.overrides.task}
    for name, node in files.items():
        atomic_write_text(target / name, OmegaConf.to_yaml(node), f"Hydra's {name}")
