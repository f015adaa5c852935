"""The launcher's contracts: a frozen sweep and task spec, and a task that requeues as itself."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from ncsweep.config import RUN_KEY_SUBDIR
from ncsweep.launcher.plan import Job, job_folders
from ncsweep.launcher.spec import Sweep, TaskSpec
from ncsweep.launcher.tasks import Task
from tests.support import compose_cfg


def spec() -> TaskSpec:
    return TaskSpec(hydra_context=None, task_function=print,  # type: ignore[arg-type]
                    config=OmegaConf.create({"seed": 0}), launched=1.0,
                    resources={"cpus_per_task": 2, "partition": "local"}, runs_in_parallel=2)


def test_specs_are_frozen_and_a_sweep_names_a_known_launcher() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec().resources = {}  # type: ignore[misc]
    with pytest.raises(ValueError, match="launcher kind 'nosuch'"):
        Sweep("nosuch", None, print, OmegaConf.create())  # type: ignore[arg-type]


def test_a_task_pickles_with_its_spec_and_requeues_as_the_same_task() -> None:
    units = [[Job(("seed=0",), 0, "/tmp/x")]]
    task = pickle.loads(pickle.dumps(Task(spec())))
    assert task.spec.resources == {"cpus_per_task": 2, "partition": "local"}
    assert task.spec.runs_in_parallel == 2 and task.spec.job_dir_key == "hydra.sweep.dir"
    again = task.checkpoint(units)
    assert again.function is task and again.args == (units,)


def test_run_folders_by_the_run_key_equal_omegaconfs_interpolation(tmp_path) -> None:
    """conf/'s subdir is RUN_KEY_SUBDIR, which job_folders computes without the interpolation
    grammar; the folders equal OmegaConf's resolution of the same subdir, and a subdir of
    another form still goes through OmegaConf."""
    cfg = compose_cfg(["name=keys", f"hydra.sweep.dir={tmp_path}"])
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == RUN_KEY_SUBDIR
    jobs = [["seed=1", "head=etf"], [], ["dataset.n_train=5", "trainer.progress=false"],
            ["optim.lr=0.5", "arch.width=" + "9" * 120], ["seed=3", "hydra.launcher.mem_gb=2"]]
    fast = job_folders(cfg, jobs, 7)
    slow_cfg = copy.deepcopy(cfg)
    with open_dict(slow_cfg):
        slow_cfg.hydra.sweep.subdir = "${ncsweep.key:${hydra.job.override_dirname}}/."
    slow = job_folders(slow_cfg, jobs, 7)
    assert [str(p) for p in fast] == [str(Path(p)) for p in slow]
    assert fast[1].name == "default" and fast[0].name == "head=etf,seed=1"
    assert fast[4].name == "seed=3" and len(fast[3].name) <= 96
    with open_dict(slow_cfg):
        slow_cfg.hydra.sweep.subdir = "job${hydra.job.num}"
    assert [p.name for p in job_folders(slow_cfg, jobs[:2], 7)] == ["job7", "job8"]
