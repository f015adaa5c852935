"""Optimisers and LR schedules the configs name (``optim/lbfgs``, ``schedule/*``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LBFGS(torch.optim.LBFGS):
    """LBFGS with L2 weight decay folded into the closure (torch's LBFGS has none)."""

    def __init__(self, params, lr: float = 1.0, weight_decay: float = 0.0, **kwargs) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.weight_decay = weight_decay

    def step(self, closure):  # type: ignore[override]
        if not self.weight_decay:
            return super().step(closure)
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]

        def decayed():
            loss = closure()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=self.weight_decay)
                return loss + 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in params)

        return super().step(decayed)


def multistep_schedule(optimizer: torch.optim.Optimizer, epochs: int,
                       milestones: Sequence[float] = (1 / 3, 2 / 3), gamma: float = 0.1):
    """LR times ``gamma`` at each milestone: an epoch number, or a fraction of the epochs if < 1."""
    at = sorted({round(m * epochs) if m < 1 else int(m) for m in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=at, gamma=gamma)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int, eta_min: float = 0.0):
    """Cosine decay over the whole run."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1),
                                                      eta_min=eta_min)


def constant_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """No schedule: the LR stays where the optimiser put it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
