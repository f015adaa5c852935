"""Every private Hydra name ncsweep relies on, in one place, for the one Hydra it is tested on.

Hydra 1.3 keeps its basic launcher and sweeper, its config loader, the function that names run
folders and a job's raw return value in private modules and fields, which any release may
change. pyproject.toml pins hydra-core to ``HYDRA_VERSION``, and tests/test_hydra_compat.py
checks that version and each entry point's signature, so an upgrade fails there first, with the
name that moved. Hydra imports the ncsweep plugins at start-up: this module stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_launcher import BasicLauncher, BasicLauncherConf
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus

HYDRA_VERSION = "1.3.8"

__all__ = ["HYDRA_VERSION", "BasicLauncher", "BasicLauncherConf", "BasicSweeper",
           "BasicSweeperConf", "ConfigLoaderImpl", "caching_repository", "config_loader",
           "create_config_search_path", "get_overrides_dirname",
           "job_return", "overrides_dirname", "raw_return"]


def overrides_dirname(task: Sequence[Override], naming: Any) -> str:
    """``hydra.job.override_dirname`` of a job's task overrides, named as Hydra names it
    (``naming`` is ``hydra.job.config.override_dirname``)."""
    return get_overrides_dirname(overrides=list(task), exclude_keys=list(naming.exclude_keys),
                                 item_sep=naming.item_sep, kv_sep=naming.kv_sep)


def caching_repository(loader: Any, config_name: str | None) -> Any:
    """The loader's config repository for a primary config, which knows the config groups."""
    _, repository = loader._parse_overrides_and_create_caching_repo(config_name, [])
    return repository


def config_loader(conf_dir: str, loader_class: type[ConfigLoaderImpl] = ConfigLoaderImpl
                  ) -> ConfigLoaderImpl:
    """Hydra's own config loader (or a subclass) over one primary config folder, as the CLI
    builds it."""
    return loader_class(config_search_path=create_config_search_path(conf_dir))


def raw_return(ret: JobReturn) -> Any:
    """A job's return value, or the exception it raised (``return_value`` re-raises that)."""
    return ret._return_value


def job_return(overrides: Sequence[str], value: Any, status: JobStatus = JobStatus.COMPLETED,
               hydra_cfg: Any = None) -> JobReturn:
    """A JobReturn with its value (or, for a failed job, its exception) and nothing else."""
    return JobReturn(overrides=list(overrides), status=status, hydra_cfg=hydra_cfg,
                     _return_value=value)
