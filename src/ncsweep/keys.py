"""Config facts written once: the keys that name a run, the keys that leave the experiment as
it is, and overrides read with Hydra's own parser.

conf/config.yaml repeats :data:`NOT_EXPERIMENT` as ``hydra.job.config.override_dirname.
exclude_keys`` (Hydra reads it before any Python runs); tests/test_keys.py composes conf/ and
checks the two agree and that every key named here exists.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override

IDENTITY_GROUPS = ("dataset", "arch", "head", "loss", "optim", "schedule", "launcher",
                   "experiment")
"""The group choices a run records in run.json: with its overrides, they say what it is."""

NOT_EXPERIMENT = ("name", "launcher", "logger", "trainer.resume", "trainer.progress",
                  "trainer.device", "trainer.ensemble", "report.at_end", "lease.heartbeat_s",
                  "lease.stale_after_s")
"""Keys that change where and how a job runs, never what it trains: left out of run keys."""

NOT_EXPERIMENT_PREFIXES = ("hydra.", "logger.", "launcher.")
"""Key prefixes of the nodes behind those choices: they never change the experiment either."""

NOT_EXPERIMENT_COLUMNS = tuple(key.rpartition(".")[2] for key in NOT_EXPERIMENT)
"""The run.json and summary.json columns that record a :data:`NOT_EXPERIMENT` key."""

COMPARED = ("seed", "head", "dim")
"""What a report cell averages over (seed) or its claims compare (head, dim)."""

__all__ = ["COMPARED", "IDENTITY_GROUPS", "NOT_EXPERIMENT", "NOT_EXPERIMENT_COLUMNS",
           "NOT_EXPERIMENT_PREFIXES", "changes_experiment", "override_key",
           "override_values", "parse_or_none", "parse_override"]


@cache
def _parser() -> OverridesParser:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@lru_cache(maxsize=100_000)
def parse_override(text: str) -> Override:
    """One override as Hydra reads it; raises HydraException where it cannot.

    Cached: the command line's checks each read it, and a 10,000-run sweep's jobs repeat most of
    their lines (a 10,000-value sweep takes 0.3 s to parse once).
    """
    return _parser().parse_override(text)


def parse_or_none(text: str) -> Override | None:
    """``text`` as Hydra reads an override, or None where its grammar does not read it."""
    from hydra.errors import HydraException

    try:
        return parse_override(text)
    except HydraException:
        return None


def override_key(override: Override) -> str:
    """The key an override sets as Hydra writes it, ``~`` of a deletion and ``@package`` kept,
    the ``+`` of an added key dropped (adding a key and setting it are one change)."""
    return override.get_key_element().lstrip("+")


def override_values(override: Override) -> list[str] | None:
    """The values an override sets, as Hydra writes them (``a,b`` gives both), or None where it
    sets something other than plain values (a list, a dict, an interval, a glob, an
    interpolation), left to Hydra."""
    if override.is_choice_sweep() or override.is_range_sweep():
        values = list(override.sweep_iterator())
    elif override.is_sweep_override():
        return None
    else:
        values = [override.value()]
    if not all(v is None or isinstance(v, (str, int, float)) for v in values):
        return None
    if any(isinstance(v, str) and "${" in v for v in values):
        return None
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def changes_experiment(key: str) -> bool:
    """Whether setting ``key`` can change what a job trains: not a :data:`NOT_EXPERIMENT` key."""
    return bool(key) and key not in NOT_EXPERIMENT and not key.startswith(NOT_EXPERIMENT_PREFIXES)
