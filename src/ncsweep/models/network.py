"""The network: a backbone ending in d features, a head on them, and the backbone's hooks.

Every backbone derives from :class:`Backbone`, whose hooks let a model add to the objective
and to its own measurements (the UFM uses all of them); ordinary networks keep the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    """A module mapping inputs to d features, with hooks the trainer and the job call.

    ``kind`` (mlp, vision, ufm) is what configs and checks read from the class instead of its
    name; ``starts`` is the number of batched random starts the backbone holds (None: one
    start, trained by the optimiser).
    """

    kind: str = ""
    starts: int | None = None
    _frozen_norms: tuple[nn.Module, ...] = ()
    transfer_record: Mapping[str, Any] = MappingProxyType({})

    def last_block(self) -> list[nn.Module]:
        """The modules that ``freeze=all_but_last_block`` leaves trainable."""
        raise NotImplementedError(f"{type(self).__name__} has no last block to keep trainable")

    def start_from(self, weights: str | None, weights_strict: bool, freeze: str) -> None:
        """``arch.weights``, then ``arch.freeze`` (models.transfer), noted for the summary."""
        from ncsweep.models import transfer

        record = (transfer.load_weights(self, weights, weights_strict) if weights
                  else {"weights": None})
        keep = self.last_block() if freeze == "all_but_last_block" else []
        self._frozen_norms = tuple(transfer.freeze(self, freeze, keep))
        self.transfer_record = {**record, "freeze": freeze}

    def train(self, mode: bool = True) -> Backbone:
        """Frozen BatchNorm layers keep their running statistics (eval mode) while training."""
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    def penalty(self, head: nn.Module) -> torch.Tensor | float:
        """Extra regularisation of the objective beyond the optimiser's weight decay."""
        return 0.0

    def example_input(self, batch_size: int, input_shape: Sequence[int]) -> torch.Tensor:
        """A random batch of the data's shape, for dry runs."""
        device = next(self.parameters()).device
        return torch.randn(batch_size, *input_shape, device=device)

    def eval_metrics(self, head: nn.Module, loss_fn: nn.Module) -> dict[str, float]:
        """Model-specific metrics added to every eval row."""
        return {}

    def final_checks(self, head: nn.Module, loss_fn: nn.Module, final: dict) -> dict:
        """Model-specific end-of-run checks added to the summary."""
        return {}

    def run_files(self) -> dict[str, str]:
        """Extra run-folder files by name, as text, written before DONE."""
        return {}


class Network(nn.Module):
    """backbone -> d features -> head; ``features_and_logits`` gives the head's exact input."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.head(features)

    def penalty(self) -> torch.Tensor | float:
        """The backbone's extra regularisation (the UFM's lambdas); 0 for ordinary networks."""
        return self.backbone.penalty(self.head)

    def example_input(self, batch_size: int, input_shape: Sequence[int]) -> torch.Tensor:
        """A random batch of the data's shape, for dry runs."""
        return self.backbone.example_input(batch_size, input_shape)
