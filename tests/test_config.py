"""The real config tree: every option composes, dim resolves, bad values get one-line errors."""

from __future__ import annotations

import pytest

from ncsweep.config import ConfigError, check_overrides, resolve_dim, run_key, validate
from tests.support import CONF, compose_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "launcher")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group in ("dataset", "arch") and option == "ufm":
        overrides = ["experiment=ufm"]
    cfg = compose_cfg(overrides)
    plain = validate(cfg)
    assert plain["feature_dim"] >= 1
    assert cfg.hydra.runtime.choices[group] == option


@pytest.mark.parametrize("launcher", options("launcher"))
def test_launcher_options_select_a_hydra_launcher(launcher: str) -> None:
    cfg = compose_cfg([f"launcher={launcher}"])
    target = cfg.hydra.launcher._target_
    expected = {"basic": "BasicLauncher", "local": "LocalLauncher", "slurm": "SlurmLauncher"}
    assert target.endswith(expected[launcher])


@pytest.mark.parametrize("value,k,expected", [
    ("K", 10, 10), ("K-1", 10, 9), ("K+1", 7, 8), ("2K", 10, 20), ("3*K", 4, 12),
    ("512", 10, 512), (64, 100, 64), (" K ", 3, 3),
])
def test_resolve_dim(value: object, k: int, expected: int) -> None:
    assert resolve_dim(value, k) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-3", "K-10", "K*K", "1.5", True])
def test_resolve_dim_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^dim=.* is not allowed: a positive integer"):
        resolve_dim(value, 10)


def test_dim_k_resolves_to_the_dataset_classes() -> None:
    assert validate(compose_cfg(["dim=K"]))["feature_dim"] == 10
    assert validate(compose_cfg(["dim=K-1", "dataset=synthetic", "dataset.num_classes=4"])
                    )["feature_dim"] == 3


@pytest.mark.parametrize("overrides,key,fragment", [
    (["head=etf", "dim=K-2"], "dim", "d >= K-1 = 9"),
    (["optim.lr=-0.1"], "optim.lr", "a number > 0"),
    (["trainer.epochs=-1"], "trainer.epochs", "a number >= 0"),
    (["trainer.batch_size=0"], "trainer.batch_size", "a positive integer"),
    (["trainer.resume=sometimes"], "trainer.resume", "auto, never, must"),
    (["trainer.device=tpu"], "trainer.device", "auto, cpu, cuda"),
    (["experiment=ufm", "optim.weight_decay=0.1"], "optim.weight_decay", "0 with arch=ufm"),
    (["arch=ufm"], "arch", "arch=ufm and dataset=ufm go together"),
])
def test_validate_names_key_value_and_allowed(overrides: list[str], key: str,
                                              fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    message = str(err.value)
    assert err.value.key == key and fragment in message and "\n" not in message


def test_check_overrides_catches_unknown_options_and_dims_before_hydra() -> None:
    with pytest.raises(ConfigError, match="head='fixed' is not allowed: one of etf, learned"):
        check_overrides(["-m", "head=etf,fixed"], CONF)
    with pytest.raises(ConfigError, match="dim='x'"):
        check_overrides(["dim=K,x"], CONF)
    check_overrides(["head=etf,learned", "dim=K,512", "trainer.epochs=3", "+foo=1"], CONF)


def test_run_key_is_safe_and_stable() -> None:
    assert run_key("") == "default"
    assert run_key("dim=K,head=etf") == "dim=K,head=etf"
    long = run_key("dataset.root=/data/a b/" + "x" * 200)
    assert "/" not in long and " " not in long and len(long) <= 96
    assert long == run_key("dataset.root=/data/a b/" + "x" * 200)
