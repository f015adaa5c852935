"""A job's override lines as Hydra parses them, through the one cached parser in ncsweep.keys: a
10,000-run sweep repeats most of its lines."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.types import Override

from ncsweep.keys import parse_override


def parse(lines: Sequence[str]) -> list[Override]:
    """Override lines as ``OverridesParser.parse_overrides`` gives them, each parsed once."""
    return [parse_override(line) for line in lines]
