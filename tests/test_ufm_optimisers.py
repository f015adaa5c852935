"""Every optimiser composes with every UFM experiment: the overlay's LBFGS keys never leak."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from ncsweep.config import group_options, validate
from tests.support import CONF, FAST, compose_cfg


@pytest.mark.parametrize("experiment", ["ufm", "ufm_landscape"])
@pytest.mark.parametrize("optim", group_options(CONF / "optim"))
def test_every_optimiser_builds_under_every_ufm_experiment(experiment: str, optim: str) -> None:
    cfg = compose_cfg([f"experiment={experiment}", f"optim={optim}"])
    plain = validate(cfg)
    assert plain["optim"]["weight_decay"] == 0.0  # the UFM's lambdas regularise
    optimizer = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer).__name__.lower().startswith(optim.split("_")[0])


def test_the_readmes_gradient_descent_line_trains_the_ufm(job_runner) -> None:
    _, summary = job_runner([*FAST, "experiment=ufm", "optim=sgd", "optim.momentum=0",
                             "trainer.batch_size=null", "trainer.epochs=5", "optim.lr=1"])
    assert summary["status"] == "done" and summary["optim"] == "sgd"
    assert summary["objective_gap"] > 0
