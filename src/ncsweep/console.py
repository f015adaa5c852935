"""What a user sees: the ``ncsweep`` logger's two streams and one live progress line.

INFO goes to stdout and WARNING or worse to stderr, each line prefixed ``ncsweep:``. The
handlers look up ``sys.stdout``/``sys.stderr`` when they write, so redirected streams (a test's
capture, a notebook) get the lines too. The progress line redraws itself in place on a terminal
and is silent elsewhere: logs under a scheduler keep only the logged lines.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

PREFIX = "ncsweep: "


class _CurrentStream(logging.StreamHandler):
    """A stream handler bound to whatever ``sys.<name>`` is at the time of each record."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Route the ``ncsweep`` loggers to stdout (INFO) and stderr (WARNING+); idempotent."""
    logger = logging.getLogger("ncsweep")
    logger.setLevel(level)
    if any(isinstance(h, _CurrentStream) for h in logger.handlers):
        return
    formatter = logging.Formatter(PREFIX + "%(message)s")
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.propagate = False


class Progress:
    """One status line redrawn in place on a terminal (stderr); nothing when not on one."""

    def __init__(self, enabled: bool = True) -> None:
        self.live = enabled and sys.stderr.isatty()
        self._drawn = False

    def update(self, text: str) -> None:
        if self.live:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            self._drawn = True

    def clear(self) -> None:
        """Wipe the line, so that a logged line does not land in the middle of it."""
        if self._drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._drawn = False
