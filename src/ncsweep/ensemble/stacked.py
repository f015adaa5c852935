"""The members' networks stacked on a leading dimension, their losses and optimiser states."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Stacked(nn.Module):
    """R networks of one architecture as stacked tensors (member first) and a batched forward.

    Parameters and buffers keep the members' names (``backbone.layers.1.weight``); trainable
    ones are leaves with gradients, the rest (a frozen ETF, BN statistics) plain tensors.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        first = models[0]
        self.members = len(models)
        self.tensors: dict[str, torch.Tensor] = {}
        self.trainable: list[torch.Tensor] = []
        for name, p in first.named_parameters():
            stacked = nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach()
                                                for m in models]), requires_grad=p.requires_grad)
            self.register_parameter(name.replace(".", "__"), stacked)
            self.tensors[name] = stacked
            if p.requires_grad:
                self.trainable.append(stacked)
        for name, _ in first.named_buffers():
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models]).clone()
            self.register_buffer(name.replace(".", "__"), stacked)
            self.tensors[name] = stacked
        self.is_ufm = first.backbone.kind == "ufm"
        # plain tuples, not submodules: the stack must not own member 0's tensors
        self.layers = () if self.is_ufm else tuple(first.backbone.layers)
        self.lambdas = first.backbone.lambdas if self.is_ufm else (0.0, 0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, B, ...) inputs (UFM: (R, B) sample indices) to (R, B, K) logits."""
        return self._linear("head", self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_ufm:
            h = self.tensors["backbone.features"]
            return torch.gather(h, 1, x[..., None].expand(-1, -1, h.shape[-1]))
        x = x.flatten(2)
        for i, module in enumerate(self.layers):
            prefix = f"backbone.layers.{i}"
            if isinstance(module, nn.Flatten):
                continue
            if isinstance(module, nn.Linear):
                x = self._linear(prefix, x)
            elif isinstance(module, nn.BatchNorm1d):
                x = self._batch_norm(prefix, module, x)
            else:
                x = module(x)
        return x

    def _linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors[f"{prefix}.weight"], self.tensors.get(f"{prefix}.bias")
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))

    def _batch_norm(self, prefix: str, module: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d per member as one BN over R x F channels: torch's own kernel, which in
        training moves each member's running statistics on that member's batch."""
        members, batch, width = x.shape
        tracked = self.tensors[f"{prefix}.num_batches_tracked"]
        momentum = module.momentum
        if self.training:
            tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(tracked[0])
        flat = x.transpose(0, 1).reshape(batch, members * width)
        weight, bias = (self.tensors.get(f"{prefix}.{k}") for k in ("weight", "bias"))
        y = F.batch_norm(flat, self.tensors[f"{prefix}.running_mean"].view(-1),
                         self.tensors[f"{prefix}.running_var"].view(-1),
                         None if weight is None else weight.view(-1),
                         None if bias is None else bias.view(-1),
                         training=self.training, momentum=momentum or 0.0, eps=module.eps)
        return y.view(batch, members, width).transpose(0, 1)

    def penalty(self) -> torch.Tensor | float:
        """Each member's extra regularisation (the UFM's lambdas), shape (R,); 0 for the MLP."""
        if not self.is_ufm:
            return 0.0
        lambda_w, lambda_h, lambda_b = self.lambdas
        value = 0.5 * lambda_h * self.tensors["backbone.features"].pow(2).sum(dim=(1, 2))
        value = value + 0.5 * lambda_w * self.tensors["head.weight"].pow(2).sum(dim=(1, 2))
        bias = self.tensors.get("head.bias")
        if bias is not None and lambda_b:
            value = value + 0.5 * lambda_b * bias.pow(2).sum(dim=1)
        return value

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy each member's slice into its own network (for eval points and checkpoints)."""
        for r, model in enumerate(models):
            for name, t in (*model.named_parameters(), *model.named_buffers()):
                t.copy_(self.tensors[name][r])

    @torch.no_grad()
    def read_from(self, models: Sequence[nn.Module]) -> None:
        """The members' networks into the stack (after they loaded a checkpoint)."""
        for r, model in enumerate(models):
            for name, t in (*model.named_parameters(), *model.named_buffers()):
                self.tensors[name][r].copy_(t)


def member_losses(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each member's mean training loss on its own batch (the scale of ncsweep.losses), (R,)."""
    if name == "ce":  # classes on dim 1: torch's kernel then runs along the batch, 2-3x faster
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)
    minus_one = torch.full((*labels.shape, 1), -1.0, dtype=logits.dtype, device=logits.device)
    residual = logits.scatter_add(2, labels[..., None], minus_one)
    return 0.5 * residual.pow(2).sum(dim=2).mean(dim=1)


def member_optimizer_state(state: dict, params: Sequence[torch.Tensor], r: int) -> dict:
    """Member r's slice of the stacked optimiser's state dict, in the solo run's format."""
    sliced = {}
    for index, entries in state["state"].items():
        shape = params[index].shape
        sliced[index] = {k: (v[r].clone() if isinstance(v, torch.Tensor) and v.shape == shape
                             else v.clone() if isinstance(v, torch.Tensor) else v)
                         for k, v in entries.items()}
    return {"state": sliced, "param_groups": copy.deepcopy(state["param_groups"])}


def stacked_optimizer_state(states: Sequence[dict], params: Sequence[torch.Tensor]) -> dict:
    """The members' solo-format optimiser states as one state dict of the stacked optimiser."""
    merged = {}
    for index, entries in states[0]["state"].items():
        shape = params[int(index)].shape[1:]
        merged[index] = {k: (torch.stack([s["state"][index][k] for s in states])
                             if isinstance(v, torch.Tensor) and v.shape == shape else v)
                         for k, v in entries.items()}
    return {"state": merged, "param_groups": copy.deepcopy(states[0]["param_groups"])}
