"""Hydra's private names behind ncsweep.launcher.hydra_compat: an upgrade fails here first."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable

import hydra
import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobRuntime, JobStatus
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from ncsweep.launcher import hydra_compat as compat
from ncsweep.launcher.compose import SweepComposer
from tests.support import CONF, ROOT

JobRuntime.instance().set("name", "app")

# Each private entry point ncsweep calls, with the parameters it passes (by name or position).
SIGNATURES: list[tuple[str, Callable, list[str]]] = [
    ("get_overrides_dirname", compat.get_overrides_dirname,
     ["overrides", "exclude_keys", "item_sep", "kv_sep"]),
    ("create_config_search_path", compat.create_config_search_path, ["search_path_dir"]),
    ("ConfigLoaderImpl.__init__", compat.ConfigLoaderImpl.__init__,
     ["self", "config_search_path"]),
    ("ConfigLoaderImpl._parse_overrides_and_create_caching_repo",
     compat.ConfigLoaderImpl._parse_overrides_and_create_caching_repo,
     ["self", "config_name", "overrides"]),
    ("ConfigLoaderImpl.load_sweep_config", compat.ConfigLoaderImpl.load_sweep_config,
     ["self", "master_config", "sweep_overrides"]),
    ("BasicLauncher.launch", compat.BasicLauncher.launch,
     ["self", "job_overrides", "initial_job_idx"]),
    ("BasicSweeper.validate_batch_is_legal", compat.BasicSweeper.validate_batch_is_legal,
     ["self", "batch"]),
]


def test_hydra_is_the_pinned_version() -> None:
    pins = re.findall(r'"hydra-core==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins == [compat.HYDRA_VERSION], "pyproject.toml pins hydra-core to HYDRA_VERSION"
    assert hydra.__version__ == compat.HYDRA_VERSION, (
        f"hydra-core {hydra.__version__} is installed; ncsweep.launcher.hydra_compat is checked "
        f"against {compat.HYDRA_VERSION}: re-check every name it imports, then its pin")


@pytest.mark.parametrize(("name", "function", "params"), SIGNATURES,
                         ids=[name for name, _, _ in SIGNATURES])
def test_each_private_entry_point_keeps_its_signature(name: str, function: Callable,
                                                      params: list[str]) -> None:
    assert list(inspect.signature(function).parameters)[:len(params)] == params, name


def test_the_private_fields_ncsweep_reads_are_there() -> None:
    assert "_return_value" in {f.name for f in dataclasses.fields(JobReturn)}
    assert {"max_batch_size", "params"} <= {f.name for f in dataclasses.fields(
        compat.BasicSweeperConf)}
    assert dataclasses.is_dataclass(compat.BasicLauncherConf)


def test_the_entry_points_answer_as_ncsweep_reads_them() -> None:
    loader = compat.config_loader(str(CONF))
    master = loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)
    repository = compat.caching_repository(loader, "config")
    assert repository.group_exists("head") and not repository.group_exists("seed")
    naming = OmegaConf.create({"kv_sep": "=", "item_sep": ",", "exclude_keys": ["seed"]})
    task = OverridesParser.create().parse_overrides(["seed=1", "head=etf", "dim=K"])
    assert compat.overrides_dirname(task, naming) == "dim=K,head=etf"
    assert loader.load_sweep_config(master, ["seed=3"]).seed == 3
    failed = compat.job_return(["seed=1"], ValueError("x"), JobStatus.FAILED)
    assert isinstance(compat.raw_return(failed), ValueError)
    assert compat.raw_return(compat.job_return(["seed=1"], {"status": "done"})) == {
        "status": "done"}


@dataclasses.dataclass
class Typed:
    seed: int = 0


ConfigStore.instance().store(name="typed_for_compat_test", node=Typed)


def test_a_fallback_to_hydras_composition_says_why(caplog: pytest.LogCaptureFixture) -> None:
    loader = compat.config_loader(str(CONF))
    master = loader.load_configuration("typed_for_compat_test", overrides=[],
                                       run_mode=RunMode.MULTIRUN)
    composer = SweepComposer(loader, master)
    composer.load(["seed=0"])
    with caplog.at_level(logging.INFO, logger="ncsweep.launcher.compose"):
        for bad in ("seed=abc", "seed=xyz"):
            with pytest.raises(ConfigCompositionException):
                composer.load([bad])
    said = [r.getMessage() for r in caplog.records if r.name == "ncsweep.launcher.compose"]
    assert len(said) == 1, said  # once per cause, however many jobs it concerns
    assert said[0].startswith("composer: Hydra composes the job itself: setting seed raised "
                              "ValidationError"), said
