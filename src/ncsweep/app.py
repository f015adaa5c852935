"""The Hydra app behind ``python -m ncsweep``: finds conf/, checks the command line, runs a job."""

from __future__ import annotations

import sys
from pathlib import Path

from ncsweep.config import ConfigError, check_overrides, command_overrides, register_resolvers
from ncsweep.keys import override_values
from ncsweep.preflight import check_command

register_resolvers()


def conf_dir() -> Path:
    """conf/ shipped inside the package (a wheel) or at the repository root (a checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SystemExit(f"ncsweep: error: no conf/config.yaml beside {here} or in the repository")


def task(cfg) -> dict:
    """One job; imported lazily so that config errors never wait for torch."""
    from ncsweep.jobs import run_job

    return run_job(cfg)


SWEEP_LAUNCHERS = ("slurm", "local")
INSPECTING = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion",
              "-sc")


def launcher_error(args: list[str]) -> str | None:
    """``launcher=slurm|local`` only means something to a sweep: without ``-m`` say what to type."""
    if any(a in ("-m", "--multirun") or a in INSPECTING for a in args):
        return None
    for override in command_overrides(args):
        values = override_values(override) or []
        value = values[0] if len(values) == 1 and not override.is_delete() else None
        if override.key_or_group == "launcher" and value in SWEEP_LAUNCHERS:
            return (f"launcher={value} applies to sweeps (-m); a single run without -m runs in "
                    f"this process. Type: python -m ncsweep -m {' '.join(args)}")
    return None


def main() -> None:
    """Entry point: one-line errors for bad choices, keys, seeds, folders, launchers; then Hydra."""
    import hydra

    conf = conf_dir()
    args = sys.argv[1:]
    try:
        check_overrides(args, conf)
        check_command(args, conf, inspecting=any(a in INSPECTING for a in args))
    except ConfigError as err:
        print(f"ncsweep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    problem = launcher_error(args)
    if problem:
        print(f"ncsweep: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    modes = [a for a in args if a in MODES]
    if len(modes) > 1:
        print(f"ncsweep: error: {' and '.join(modes)} do not go together: choose one "
              "(-m runs a sweep, --cfg job shows one job's config)", file=sys.stderr)
        raise SystemExit(2)
    if _shown(args) == "job" and "--resolve" not in args:
        sys.argv.append("--resolve")  # the hydra node's own interpolations need a job to resolve
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(task)()


MODES = ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def _shown(args: list[str]) -> str | None:
    """The part of the config ``--cfg``/``-c`` shows (job, hydra or all), or None."""
    for flag in ("--cfg", "-c"):
        if flag in args:
            index = args.index(flag)
            return args[index + 1] if index + 1 < len(args) else None
    return None
