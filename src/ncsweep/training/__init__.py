"""Training: the loop (``Trainer``), its steppers, eval points, optimisers and schedules."""

from ncsweep.training.checkpoint import check_global_batch
from ncsweep.training.evaluation import Row, evaluate, minority_collapse
from ncsweep.training.loop import (
    FitResult,
    NonFiniteLoss,
    Stepper,
    StopRequested,
    Trainer,
    count_parameters,
    resolve_device,
)
from ncsweep.training.optim import LBFGS, constant_schedule, cosine_schedule, multistep_schedule
from ncsweep.training.single import ModelStepper, optimizer_step
from ncsweep.training.starts import StartsStepper

__all__ = ["LBFGS", "FitResult", "ModelStepper", "NonFiniteLoss", "Row", "StartsStepper",
           "Stepper", "StopRequested", "Trainer", "check_global_batch", "constant_schedule",
           "cosine_schedule", "count_parameters", "evaluate", "minority_collapse",
           "multistep_schedule", "optimizer_step", "resolve_device"]
