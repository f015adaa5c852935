"""The launcher's contracts: a frozen sweep and task spec, and a task that requeues as itself."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from omegaconf import OmegaConf

from ncsweep.launcher.plan import Job
from ncsweep.launcher.spec import Sweep, TaskSpec
from ncsweep.launcher.tasks import Task


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
