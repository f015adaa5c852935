"""ncsweep.keys against the real conf/: every key it names exists, conf/ repeats it exactly."""

from __future__ import annotations

import json

import pytest
from omegaconf import DictConfig, OmegaConf

from ncsweep.app import launcher_error
from ncsweep.config import ConfigError, check_overrides, group_options
from ncsweep.keys import (
    COMPARED,
    IDENTITY_GROUPS,
    NOT_EXPERIMENT,
    NOT_EXPERIMENT_PREFIXES,
    changes_experiment,
    override_key,
    override_values,
    parse_override,
)
from ncsweep.report.conditions import variant_options
from ncsweep.report.rows import variant
from tests.support import CONF, compose_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
EXPERIMENTS = [None, *group_options(CONF / "experiment")]


def composed(experiment: str | None, overrides: tuple[str, ...] = ()) -> DictConfig:
    return compose_cfg([*(() if experiment is None else [f"experiment={experiment}"]),
                        *overrides])


def as_override(cfg: DictConfig, key: str) -> str:
    """``key=<its composed value>``: a group's choice, else the value written as JSON."""
    choices = cfg.hydra.runtime.choices
    if key in choices:
        return f"{key}={choices[key]}"
    return f"{key}={json.dumps(OmegaConf.select(cfg, key))}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_conf_leaves_exactly_the_not_experiment_keys_out_of_run_keys(experiment: str | None
                                                                      ) -> None:
    cfg = composed(experiment)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == list(NOT_EXPERIMENT)
    base = cfg.hydra.job.override_dirname
    again = composed(experiment, tuple(as_override(cfg, key) for key in NOT_EXPERIMENT))
    assert again.hydra.job.override_dirname == base


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_key_named_exists_in_the_composed_config(experiment: str | None) -> None:
    cfg = composed(experiment)
    choices = cfg.hydra.runtime.choices
    for group in IDENTITY_GROUPS:
        assert group in GROUPS and group in choices, group
    for key in (*NOT_EXPERIMENT, *COMPARED):
        assert key in choices or OmegaConf.select(cfg, key) is not None, key
    for prefix in NOT_EXPERIMENT_PREFIXES:
        assert prefix.rstrip(".") in ("hydra", *NOT_EXPERIMENT), prefix


def test_every_group_with_a_choice_is_recorded_or_changes_nothing() -> None:
    for group in GROUPS:
        if len(group_options(CONF / group)) > 1:
            assert group in IDENTITY_GROUPS or group in NOT_EXPERIMENT, group


def test_changes_experiment_and_variant_follow_the_keys() -> None:
    assert not any(changes_experiment(key) for key in NOT_EXPERIMENT)
    assert not changes_experiment("hydra.launcher.timeout_min")
    assert changes_experiment("dataset.imbalance") and changes_experiment("seed")
    overrides = ["+dataset.imbalance=exp", "seed=1", "head=etf", "dataset=cifar10",
                 "trainer.progress=false", "hydra.launcher.timeout_min=5", "++optim.lr=0.1",
                 "~dataset.label_noise"]
    assert variant(overrides, None) == "dataset.imbalance=exp optim.lr=0.1 ~dataset.label_noise"
    assert variant(None, "dim=K,dataset.test_fraction=0.3,name=x") == "dataset.test_fraction=0.3"


def test_overrides_are_read_by_hydra() -> None:
    sweep = parse_override("+head@aux=etf,learned")
    assert override_key(sweep) == "head@aux" and override_values(sweep) == ["etf", "learned"]
    assert override_key(parse_override("~dataset.x")) == "~dataset.x"
    assert override_values(parse_override("dim=${oops}")) is None
    assert override_values(parse_override("a=[1,2]")) is None
    assert variant_options("dataset.imbalance=exp ~dataset.x a=[1,2]") == {
        "dataset.imbalance": "exp", "~dataset.x": "", "a": "[1,2]"}


def test_a_command_line_hydra_cannot_read_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^override='dim=\[1,' is not allowed: key=value in "
                                          r"Hydra's override grammar \(.+\)$"):
        check_overrides(["dim=[1,"], CONF)
    check_overrides(["--cfg", "job", "~seed", "hydra/launcher=basic", "dim=range(1,3)"], CONF)
    with pytest.raises(ConfigError, match=r"^dim='0'"):
        check_overrides(["dim=range(0,3)"], CONF)


@pytest.mark.parametrize("args,problem", [
    (["launcher=slurm"], "launcher=slurm applies to sweeps"),
    (["+launcher=local", "seed=1"], "launcher=local applies to sweeps"),
    (["-m", "launcher=slurm"], None),
    (["launcher=slurm", "--cfg", "job"], None),
    (["launcher=basic"], None),
    (["launcher=slurm,local"], None),
])
def test_launcher_error(args: list[str], problem: str | None) -> None:
    message = launcher_error(args)
    assert message == problem if problem is None else message.startswith(problem)
