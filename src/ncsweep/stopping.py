"""Stopping on a preemption signal: the flag the training loop polls, and the hand-over to
the launcher's own handler (submitit's requeue) once the running run is saved."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
SIGNAL_AT_STEP = "NCSWEEP_SIGNAL_AT_STEP"


def planned_signal() -> tuple[int, int] | None:
    """A testing aid: ``NCSWEEP_SIGNAL_AT_STEP=STEPS:SIGNAME`` (e.g. ``148:SIGTERM``) makes a
    run send itself that signal after this process's first STEPS steps, where the loop checks
    for a stop: an interruption at a chosen step, the same on every machine and load."""
    value = os.environ.get(SIGNAL_AT_STEP)
    if not value:
        return None
    steps, _, name = value.partition(":")
    try:
        return int(steps), int(getattr(signal, name or "SIGTERM"))
    except (ValueError, AttributeError):
        raise ValueError(f"{SIGNAL_AT_STEP}={value!r} is not allowed: STEPS:SIGNAME, e.g. "
                         "148:SIGTERM") from None


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
        self.planned = planned_signal()
        self.polls = 0

    def __call__(self) -> bool:
        if self.planned is not None:
            self.polls += 1
            steps, signum = self.planned
            if self.polls == steps + 1:
                signal.raise_signal(signum)  # its Python handler runs before this returns
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
