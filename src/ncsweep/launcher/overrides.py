"""Override lines parsed once per process: a 10,000-run sweep repeats most of its lines."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

PARSER = OverridesParser.create()


@functools.lru_cache(maxsize=100_000)
def parse_line(line: str) -> Override:
    """One override line as Hydra parses it (Hydra's own error for a bad line); cached."""
    return PARSER.parse_overrides([line])[0]


def parse(lines: Sequence[str]) -> list[Override]:
    """Override lines as ``OverridesParser.parse_overrides`` gives them, each parsed once."""
    return [parse_line(line) for line in lines]
