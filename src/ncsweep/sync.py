"""``python -m ncsweep.sync SWEEP_DIR``: upload a sweep's offline W&B runs once they can reach W&B.

Compute nodes often have no internet: runs log offline into ``<run folder>/wandb/`` and this
uploads them from a machine that can reach the server (``WANDB_BASE_URL``, ``WANDB_API_KEY``).
``wandb sync`` marks what it uploaded (``*.wandb.synced``), so running this twice uploads
nothing the second time. A requeued run's attempts share one run id and are uploaded in order.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ncsweep.tracking import WandbMirror

OFFLINE_GLOB = "wandb/offline-run-*"


def offline_runs(root: Path) -> list[Path]:
    """Every offline W&B run under a sweep folder or a run folder, oldest first per folder."""
    found = set(root.glob(OFFLINE_GLOB)) | set(root.glob(f"*/{OFFLINE_GLOB}"))
    return sorted((p for p in found if p.is_dir() and not p.is_symlink()),
                  key=lambda p: (str(p.parent), p.name))


def is_synced(run: Path) -> bool:
    return any(run.glob("*.wandb.synced"))


def _attempt_batches(runs: Sequence[Path]) -> list[list[Path]]:
    """First attempts of every folder, then second attempts...: one ``wandb sync`` per batch."""
    by_folder: dict[Path, list[Path]] = {}
    for run in runs:
        by_folder.setdefault(run.parent, []).append(run)
    depth = max((len(v) for v in by_folder.values()), default=0)
    return [[v[i] for v in by_folder.values() if len(v) > i] for i in range(depth)]


def wandb_command() -> list[str]:
    """The ``wandb`` CLI of this environment."""
    beside = Path(sys.executable).with_name("wandb")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("wandb")
    return [found] if found else [sys.executable, "-m", "wandb"]


def sync(root: Path, timeout_s: float = 600) -> tuple[int, int]:
    """Upload the runs not yet synced; returns (uploaded, already synced); RuntimeError if not."""
    runs = offline_runs(root)
    todo = [r for r in runs if not is_synced(r)]
    if not todo:
        return 0, len(runs)
    import wandb

    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    problem = WandbMirror.unreachable(base_url, WandbMirror.PROBE_TIMEOUT_S)
    if problem:
        raise RuntimeError(f"W&B server {base_url} unreachable ({problem}); nothing uploaded")
    env = {**os.environ, "WANDB_ERROR_REPORTING": "false"}
    for batch in _attempt_batches(todo):
        res = subprocess.run([*wandb_command(), "sync", *map(str, batch)], capture_output=True,
                             text=True, timeout=timeout_s, env=env)
        not_synced = [r for r in batch if not is_synced(r)]
        if res.returncode != 0 or not_synced:
            lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
            detail = next((ln for ln in reversed(lines) if "error" in ln.lower()),
                          lines[-1] if lines else f"exit {res.returncode}")
            raise RuntimeError(f"wandb sync failed for {len(not_synced) or len(batch)} run(s): "
                               f"{detail.strip()}")
    return len(todo), len(runs) - len(todo)


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m ncsweep.sync",
                                  description="Upload a sweep's offline W&B runs (idempotent).")
    cli.add_argument("sweep_dir", type=Path, help="a sweep folder (multirun/NAME) or a run folder")
    args = cli.parse_args(argv)
    root = args.sweep_dir.resolve()
    if not root.is_dir():
        print(f"ncsweep.sync: error: {root} is not a folder", file=sys.stderr)
        return 2
    try:
        uploaded, skipped = sync(root)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"ncsweep.sync: error: {err}", file=sys.stderr)
        return 1
    if uploaded + skipped == 0:
        print(f"ncsweep.sync: {root}: no offline W&B runs (logger=none, or logged online)")
    else:
        print(f"ncsweep.sync: {root}: {uploaded} offline run(s) uploaded, {skipped} already "
              "synced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
