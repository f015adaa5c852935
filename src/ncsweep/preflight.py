"""A command line checked before Hydra runs anything: every override composes, seeds are
integers, the run or sweep folder can be written; each problem is one ConfigError naming the key.

A sweep composes once for its keys, not once per job: swept values take their first value, and
only a swept option of a group whose keys the command line sets is composed once per option.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from ncsweep.config import DEVICE_PATTERN, check_device, closest, group_options, read_override
from ncsweep.errors import ConfigError
from ncsweep.keys import override_values

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from hydra.errors import HydraException
    from omegaconf import DictConfig

INTEGER = re.compile(r"^[+-]?\d+$")
OTHER_CONFIG = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-sc",
                "--shell-completion", "--experimental-rerun")
"""Flags after which the command line is not conf/config.yaml's overrides: left to Hydra."""
PLACED = {"hydra.launcher.": "launcher"}
"""Key prefixes a group other than their first part fills: ``launcher=slurm`` sets these."""
LAUNCHED_HERE = ("basic", "local")
"""Launchers whose jobs run on this machine, so its devices are theirs."""
FOLDER_KEYS = {False: "hydra.run.dir", True: "hydra.sweep.dir"}
__all__ = ["as_typed", "check_command", "check_composes", "check_devices", "check_folder",
           "check_seeds", "compositions", "group_of"]


def check_command(args: list[str], conf_dir: Path, inspecting: bool = False) -> None:
    """Every check of this module on one command line (``inspecting``: nothing is written)."""
    if any(a.startswith(OTHER_CONFIG) for a in args):
        return
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [read_override(arg) for arg in args if not arg.startswith("-")
                 and ("=" in arg or arg.startswith("~"))]
    check_seeds(overrides)
    if not multirun:
        _check_single_values(overrides)
    check_composes(overrides, conf_dir)
    if not inspecting:
        key = FOLDER_KEYS[multirun]
        check_folder(key, _folder_value(overrides, key, conf_dir))
        check_devices(overrides)


def check_seeds(overrides: list[Override]) -> None:
    """``seed`` and each of its swept values must be an integer: refused before any run starts."""
    for override in overrides:
        if override.key_or_group != "seed" or override.is_delete() or _integer_range(override):
            continue
        for value in override_values(override) or [as_typed(override)]:
            if not INTEGER.match(str(value).strip()):
                raise ConfigError("seed", value, "an integer (a sweep: -m seed=0,1,2 or "
                                  "-m 'seed=range(0,10)')")


def check_devices(overrides: list[Override]) -> None:
    """A named accelerator this machine lacks, where the jobs run here (not on a cluster's nodes).

    Imports torch only when a device other than auto or cpu is named.
    """
    launchers = [v for o in overrides if o.key_or_group == "launcher" for v in _plain_values(o)]
    if any(launcher not in LAUNCHED_HERE for launcher in launchers):
        return
    for override in overrides:
        if override.key_or_group == "trainer.device" and not override.is_delete():
            for value in _plain_values(override):
                if DEVICE_PATTERN.match(value):
                    check_device(value)


def _plain_values(override: Override) -> list[str]:
    """The values an override sets, unescaped (``cuda:1``, not ``cuda\\:1``); [] for a glob."""
    if override.is_choice_sweep() or override.is_range_sweep():
        return [str(v) for v in override.sweep_iterator()]
    return [] if override.is_sweep_override() else [str(override.value())]


def _integer_range(override: Override) -> bool:
    """``range(a,b,s)`` with integer bounds: every value is an integer, none need listing."""
    if not override.is_range_sweep():
        return False
    sweep = override.value()
    return all(isinstance(v, int) and not isinstance(v, bool)
               for v in (sweep.start, sweep.stop, sweep.step))


def _check_single_values(overrides: list[Override]) -> None:
    """Without ``-m`` a swept value is ambiguous: say how to sweep or how to write a list."""
    for override in overrides:
        if override.is_sweep_override():
            raise ConfigError(override.get_key_element().lstrip("+~"), as_typed(override),
                              "one value without -m (-m sweeps over it; [a,b] is a list)")


def check_composes(overrides: list[Override], conf_dir: Path) -> None:
    """Compose conf/ with the command line's keys, as few times as its sweeps allow."""
    from hydra.errors import HydraException

    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    if all(_is_group_choice(o, groups) for o in overrides):
        return
    for lines in compositions(overrides, groups):
        try:
            _compose(conf_dir, lines)
        except HydraException as err:
            raise _explain(err, lines, overrides, groups, conf_dir) from None


def _is_group_choice(override: Override, groups: set[str]) -> bool:
    """A plain group choice (``head=etf``): check_overrides has checked it against conf/."""
    return (override.key_or_group in groups and override.package is None
            and not (override.is_add() or override.is_delete() or override.is_force_add()))


def as_typed(override: Override) -> str:
    """An override's value as the command line wrote it (a sweep's too)."""
    if override.input_line and "=" in override.input_line:
        return override.input_line.partition("=")[2]
    return "" if override.is_delete() else override.get_value_element_as_str()


def _single(override: Override, value: str) -> str:
    """The override setting one of a sweep's values."""
    return f"{override.get_key_element()}={value}"


def compositions(overrides: list[Override], groups: set[str]) -> Iterator[list[str]]:
    """Override lists that between them compose every key of every job of the command line."""
    first: list[str] = []
    swept: list[tuple[int, Override, list[str]]] = []
    for override in overrides:
        if not override.is_sweep_override():
            first.append(override.input_line or _single(override, override.value()))
            continue
        if override.key_or_group not in groups:
            value = _first_value(override)
            if value is not None:
                first.append(_single(override, value))
            continue
        values = override_values(override)
        if values:
            first.append(_single(override, values[0]))
            swept.append((len(first) - 1, override, values[1:]))
    yield first
    filled = {group_of(o.key_or_group) for o in overrides if "." in o.key_or_group}
    for index, override, values in swept:
        group = override.key_or_group
        if group == "experiment" or group in filled:
            for value in values:
                yield [*first[:index], _single(override, value), *first[index + 1:]]


def _first_value(override: Override) -> str | None:
    """A choice or range sweep's first value as Hydra writes it, without listing the rest."""
    if not (override.is_choice_sweep() or override.is_range_sweep()):
        return None
    return next(iter(override.sweep_string_iterator()), None)


def group_of(key: str) -> str:
    """The group whose choice decides whether ``key`` exists (its first part, but see PLACED)."""
    return next((g for prefix, g in PLACED.items() if key.startswith(prefix)),
                key.partition(".")[0])


def _compose(conf_dir: Path, lines: list[str]) -> DictConfig:
    """conf/config.yaml composed with ``lines``, Hydra's node included."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose("config", overrides=lines, return_hydra_config=True)


def _explain(err: HydraException, lines: list[str], overrides: list[Override], groups: set[str],
             conf_dir: Path) -> ConfigError:
    """Hydra's several-line composition error as one line naming the key and what is allowed."""
    from hydra.errors import HydraException, MissingConfigException

    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        return _missing_option(err.missing_cfg_file, list(err.options), overrides)
    message = str(err).strip()
    quoted = re.search(r"'([^']+)'", message)
    name = quoted.group(1) if quoted else getattr(err.__cause__, "full_key", None)
    override = next((o for o in overrides if name and o.key_or_group == name), None)
    key = override.get_key_element() if override else (name or "override")
    value = as_typed(override) if override else None
    missing = isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)) or (
        message.startswith("Could not delete") and "does not exist" in message)
    detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if override is not None and "An item is already at" in message:
        return ConfigError(key, value, f"{name} exists already: set it without + "
                                       f"({name}={value})")
    if override is None or not missing:
        return ConfigError(key, value, f"a key and value conf/ accepts ({detail})")
    base = [line for line in lines if line.partition("=")[0] in groups]
    try:
        return ConfigError(key, value, unknown_key(override.key_or_group, base, groups, conf_dir))
    except HydraException:
        return ConfigError(key, value, f"a key conf/ has ({detail})")


def _missing_option(missing: str, options: list[str], overrides: list[Override]) -> ConfigError:
    """An option no file of its group holds (``hydra/launcher=nope``): the group's options."""
    group, _, option = missing.rpartition("/")
    override = next((o for o in overrides if o.key_or_group.lstrip("+") == group), None)
    key = override.get_key_element() if override else group
    value = as_typed(override) if override else option
    return ConfigError(key, value, "one of " + ", ".join(options) + closest(option, options))


def unknown_key(key: str, base: list[str], groups: set[str], conf_dir: Path) -> str:
    """What is allowed in place of ``key``: the group option that has it, or the closest keys."""
    cfg = _compose(conf_dir, base)
    group = group_of(key)
    if "." in key and group in groups:
        chosen = cfg.hydra.runtime.choices.get(group)
        others = [line for line in base if line.partition("=")[0] != group]
        having = [option for option in group_options(conf_dir / group) if option != chosen
                  and _has(_compose(conf_dir, [*others, f"{group}={option}"]), key)]
        if having:
            options = " or ".join(f"{group}={option}" for option in having)
            return f"{key} exists only under {options} (this run has {group}={chosen})"
    known = [k for k in _flat_keys(OmegaConf.to_container(cfg, resolve=False))
             if key.startswith("hydra.") or k.partition(".")[0] != "hydra"]
    close = closest(key, [*known, *sorted(groups)])
    if close:
        return "no such key" + close
    parent = key.rpartition(".")[0]
    siblings = sorted({k[len(parent) + 1:].partition(".")[0] for k in known
                       if parent and k.startswith(parent + ".")})
    if siblings:
        return f"no such key; {parent} has {', '.join(siblings)}"
    top = sorted({k.partition(".")[0] for k in known})
    return f"no such key; the top-level keys are {', '.join(top)}"


_MISSING = object()


def _has(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` exists in ``cfg``, resolvable or not."""
    return OmegaConf.select(cfg, key, default=_MISSING,
                            throw_on_resolution_failure=False) is not _MISSING


def _flat_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a plain nested dict, parents included."""
    if isinstance(node, dict):
        for name, child in node.items():
            path = f"{prefix}{name}"
            yield path
            yield from _flat_keys(child, path + ".")


def _folder_value(overrides: list[Override], key: str, conf_dir: Path) -> str:
    """The run or sweep folder as the command line sets it, else as conf/config.yaml does."""
    for override in overrides:
        if override.key_or_group == key and not override.is_delete():
            value = override.value()
            return value if isinstance(value, str) else as_typed(override)
    node: Any = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    for part in key.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, str) else ""


def check_folder(key: str, value: str) -> None:
    """The folder's fixed part (before any ``${...}``) must be a folder this user can create in."""
    path = Path(value.split("${", 1)[0] or ".").expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(key, value, f"a folder you can write ({existing} is a file)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ncsweep-probe-", dir=existing))
    except OSError as err:
        raise ConfigError(key, value, f"a folder you can write (cannot create one in {existing}: "
                          f"{err.strerror})") from None
