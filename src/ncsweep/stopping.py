"""Stopping on a preemption signal: the flag the training loop polls, and the hand-over to
the launcher's own handler (submitit's requeue) once the running run is saved."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def hand_on(signum: int | None, handler: Callable | Any) -> None:
    """Call the handler the stop signal displaced (submitit's requeue), then end the process.

    The process ends either way, so a packed task never starts its next run after a stop:
    the requeue command can die of the requeue it asked for (SLURM terminates the job step,
    scontrol with it), and that error must not return to the task's loop.
    """
    if callable(handler):
        try:
            handler(signum, None)
        except (subprocess.SubprocessError, OSError) as err:
            log.warning("the requeue after the checkpoint failed (%s: %s); the run is saved: "
                        "if the job is not requeued, re-run the same command to resume",
                        type(err).__name__, err)
    raise SystemExit(128 + (signum or 0))


class StopFlag:
    """Turns SIGUSR2/SIGTERM into a flag the training loop polls between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def hand_over(self) -> None:
        """After the checkpoint: the launcher's own handler requeues, or the process exits."""
        signum = self.signum
        handler = self.previous.get(signum) if signum is not None else None
        self.restore()
        hand_on(signum, handler)
