"""Derived job configs equal Hydra's own composition, and a sweep that uses them runs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobRuntime
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import II, OmegaConf

from ncsweep.launcher.compose import SweepComposer
from ncsweep.launcher.hydra_compat import ConfigLoaderImpl, config_loader
from tests.support import CONF, FAST

JobRuntime.instance().set("name", "app")


class CountingLoader(ConfigLoaderImpl):
    """Hydra's config loader, counting the jobs it composes."""

    composed = 0

    def load_sweep_config(self, master_config: Any, sweep_overrides: list[str]) -> Any:
        self.composed += 1
        return super().load_sweep_config(master_config, sweep_overrides)


def loader_and_master(cli: list[str], primary: str = "config") -> tuple[CountingLoader, object]:
    loader = config_loader(str(CONF), CountingLoader)
    master = loader.load_configuration(primary, overrides=cli, run_mode=RunMode.MULTIRUN)
    return loader, master


def same(a: object, b: object) -> None:
    """Equal as Hydra writes them (.hydra/*.yaml), as containers, and in their struct flags."""
    assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    for path in ("", "hydra", "trainer", "hydra.job"):
        node_a, node_b = (OmegaConf.select(c, path) if path else c for c in (a, b))
        if node_a is None and node_b is None:
            continue
        assert OmegaConf.is_struct(node_a) == OmegaConf.is_struct(node_b), path
        assert OmegaConf.is_readonly(node_a) == OmegaConf.is_readonly(node_b), path


JOBS = [
    ["seed=0"], ["seed=1"], ["seed=7"],
    ["head=etf", "dim=K", "seed=0"], ["head=etf", "dim=512", "seed=1"],
    ["head=learned", "dim=K", "seed=2"], ["head=learned", "dim=K-1", "seed=2"],
    ["optim=sgd", "optim.lr=0.1", "optim.momentum=0"],
    ["optim=sgd", "optim.lr=0.01", "optim.momentum=0.9"],
    ["trainer.batch_size=null", "trainer.deterministic=true", "trainer.progress=false"],
    ["trainer.batch_size=64", "trainer.deterministic=false", "trainer.progress=true"],
    ["+trainer.extra=1", "seed=3"], ["+trainer.extra=1", "seed=4"],
    ["dataset=synthetic", "dataset.num_classes=4", "seed=0"],
    ["dataset=synthetic", "dataset.num_classes=6", "seed=0"],
    ["name=${seed}", "seed=5"], ["name=x", "seed=6"],
    ["~trainer.max_feature_bytes", "seed=1"], ["~trainer.max_feature_bytes", "seed=2"],
    ["experiment=ufm", "optim=sgd", "optim.lr=0.5"],
    ["experiment=ufm", "optim=sgd", "optim.lr=0.25"],
]


@pytest.mark.parametrize("cli", [[], ["hydra.verbose=false", "trainer.epochs=3"]])
def test_every_job_config_equals_hydras_own_composition(cli: list[str]) -> None:
    loader, master = loader_and_master(cli)
    composer = SweepComposer(loader, master)
    for job in JOBS:
        composer.check(job)
    checked = loader.composed
    for job in JOBS:
        ours = composer.load(job)
        before = loader.composed
        same(ours, loader.load_sweep_config(master, list(job)))
        loader.composed = before
    # 8 siblings composed, one per choice of groups and keys; the 4 jobs with a "+" or "~" on a
    # key are composed each time (Hydra checks those against values)
    assert checked == 12 and loader.composed == 16


def test_a_derived_job_is_a_copy_its_launcher_may_change() -> None:
    loader, master = loader_and_master([])
    composer = SweepComposer(loader, master)
    first = composer.load(["seed=0"])
    second = composer.load(["seed=1"])
    OmegaConf.set_struct(second, False)
    second.hydra.job.num = 99
    second.trainer.epochs = 1
    third = composer.load(["seed=2"])
    assert OmegaConf.is_missing(third.hydra.job, "num") and third.trainer.epochs == 100
    assert (first.seed, second.seed, third.seed) == (0, 1, 2)


@dataclass
class Typed:
    seed: int = 0
    lr: float = 0.1


@dataclass
class Optim:
    lr: float = 0.1


@dataclass
class Aliased:
    """Two keys that name one node: the order of their overrides decides its value."""

    optim: Optim = field(default_factory=Optim)
    head_optim: Optim = II("optim")  # noqa: RUF009 - OmegaConf's interpolation default


ConfigStore.instance().store(name="typed_for_test", node=Typed)
ConfigStore.instance().store(name="aliased_for_test", node=Aliased)


def test_keys_that_name_one_node_are_composed_by_hydra() -> None:
    loader, master = loader_and_master([], "aliased_for_test")
    composer = SweepComposer(loader, master)
    for job in (["optim.lr=0.5", "head_optim.lr=0.01"], ["optim.lr=0.2", "head_optim.lr=0.01"]):
        same(composer.load(job), loader.load_sweep_config(master, job))
    assert composer.load(["optim.lr=0.2", "head_optim.lr=0.01"]).optim.lr == 0.01


def test_the_copied_environment_and_directory_are_the_jobs_own(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NCSWEEP_TEST_COPY", "first")
    loader, master = loader_and_master(["hydra.job.env_copy=[NCSWEEP_TEST_COPY]"])
    composer = SweepComposer(loader, master)
    composer.check(["seed=0"])
    monkeypatch.setenv("NCSWEEP_TEST_COPY", "second")
    monkeypatch.chdir(tmp_path)
    ours = composer.load(["seed=1"])
    assert loader.composed == 1  # derived
    same(ours, loader.load_sweep_config(master, ["seed=1"]))
    assert ours.hydra.job.env_set.NCSWEEP_TEST_COPY == "second"
    assert ours.hydra.runtime.cwd == str(tmp_path)


@pytest.mark.parametrize(("primary", "sibling", "bad", "named"), [
    ("config", ["seed=0", "trainer.epochs=2"], ["seed=0", "trainer.no_such_key=1"],
     "trainer.no_such_key"),
    ("config", ["head=etf", "seed=0"], ["head=nope", "seed=0"], "nope"),
    ("config", ["seed=0"], ["seed=0,1"], "seed=0,1"),
    ("typed_for_test", ["seed=0", "lr=0.5"], ["seed=abc", "lr=0.5"], "seed=abc"),  # derived
    ("config", ["head=etf", "seed=0", "~head.seed=0"], ["head=etf", "seed=1", "~head.seed=0"],
     "head.seed"),  # "~" checks the value that seed=1 sets
    ("config", ["dim=K", "~feature_dim"], ["dim=bogus", "~feature_dim"], "~feature_dim"),
    ("config", ["head=etf", "seed=null", "+head.seed=3"], ["head=etf", "seed=1", "+head.seed=3"],
     "head.seed"),  # "+" needs the key unset, which seed=1 sets
])
def test_a_job_that_cannot_compose_raises_hydras_error(primary: str, sibling: list[str],
                                                       bad: list[str], named: str) -> None:
    loader, master = loader_and_master([], primary)
    composer = SweepComposer(loader, master)
    composer.load(sibling)
    messages = []
    for step in (composer.check, composer.load, partial(loader.load_sweep_config, master)):
        with pytest.raises(ConfigCompositionException) as raised:
            step(bad)
        messages.append(str(raised.value))
    assert messages[0] == messages[1] == messages[2] and named in messages[0]


def test_a_derived_job_writes_the_files_of_a_job_hydra_composed(tmp_path: Path) -> None:
    """Through the CLI: the last job of a 4-job sweep (derived from the first) against a sweep
    of that job alone (composed by Hydra: it has no sibling)."""
    run = [*FAST, "trainer.epochs=1", "trainer.dry_run=true", "name=s"]

    def sweep(where: str, *args: str) -> list[Path]:
        (tmp_path / where).mkdir()
        subprocess.run([sys.executable, "-m", "ncsweep", "-m", *args, *run],
                       cwd=tmp_path / where, check=True, capture_output=True, timeout=300)
        return sorted((tmp_path / where / "multirun" / "s").glob("*/.hydra"))

    ours = sweep("grid", "head=etf", "dim=K,512", "seed=0,1")
    alone = sweep("alone", "head=etf", "dim=512", "seed=1")
    assert len(ours) == 4 and len(alone) == 1
    derived = next(f for f in ours if f.parent.name == alone[0].parent.name)
    for name in ("config.yaml", "overrides.yaml"):
        assert (derived / name).read_text() == (alone[0] / name).read_text(), name
    mine, other = (yaml.safe_load((f / "hydra.yaml").read_text())["hydra"]
                   for f in (derived, alone[0]))
    for hydra in (mine, other):
        hydra["runtime"].pop("cwd"), hydra["runtime"].pop("output_dir")
        hydra["sweep"].pop("dir"), hydra["job"].pop("num"), hydra["job"].pop("id")
    assert mine["overrides"]["task"][:3] == ["head=etf", "dim=512", "seed=1"]
    assert mine == other
