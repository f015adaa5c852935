"""Transfer: start a backbone from local weights (never downloaded) and freeze parts of it.

``arch.weights`` is a path to a state dict (a ``torch.save``d mapping of names to tensors, also
under ``state_dict`` or ``model``), an ncsweep ``checkpoint.pt`` (its ``backbone.`` tensors;
the ``head.`` ones are left out), or a torchvision weights name read from the torch hub cache.
It loads strictly by default: every tensor of the backbone must be in the file with its shape
and the file must hold nothing else, or the run is refused in one line that says how many
matched. ``arch.weights_strict=false`` loads the tensors that match and records the missing,
unexpected and reshaped ones. What was loaded (path, sha256, counts) and ``freeze`` go into
the run's summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ncsweep.errors import ConfigError

FREEZE = ("none", "all_but_last_block", "all")
_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
ALLOWED = ("a state dict (a torch.save'd mapping of tensor names to tensors) or an ncsweep "
           "checkpoint.pt")
log = logging.getLogger(__name__)


class WeightsNotFound(FileNotFoundError):
    """``arch.weights`` names no local file; ncsweep never downloads weights."""


def resolve_weights(spec: str) -> Path:
    """A local weight file: a path, or a torchvision weight name in the torch hub cache."""
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        return path
    if _WEIGHTS_NAME.match(str(spec)):
        from torchvision.models import get_weight

        try:
            url = get_weight(str(spec)).url
        except (ValueError, KeyError, AttributeError) as err:
            raise WeightsNotFound(f"arch.weights={spec}: torchvision knows no such weights "
                                  f"({err})") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return cached
        raise WeightsNotFound(
            f"arch.weights={spec}: no file {cached}; ncsweep never downloads weights: copy "
            f"{os.path.basename(url)} there (from {url}), or give arch.weights=PATH")
    raise WeightsNotFound(f"arch.weights={spec}: no such file {path.resolve()}")


def read_state_dict(spec: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The file's backbone tensors by name, or a ConfigError saying why it holds none."""
    path = resolve_weights(spec)
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError("arch.weights", spec, f"{ALLOWED}; {path} cannot be read as one "
                          f"({type(err).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = f"a {type(state).__name__}" if not isinstance(state, Mapping) else "other values"
        raise ConfigError("arch.weights", spec, f"{ALLOWED}; {path} holds {kind}")
    if any(k.startswith(("backbone.", "head.")) for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    return path, {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, spec: str, strict: bool = True) -> dict[str, Any]:
    """Load ``spec`` into ``module``; returns what the summary records (module docstring)."""
    path, state = read_state_dict(spec)
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    counts = f"{len(loaded)} of {len(own)} tensors match"
    if not loaded or (strict and (reshaped or unexpected or missing)):
        detail = "; ".join(f"{what}: {_names(keys)}" for what, keys in (
            ("shape differs", reshaped), ("not in the model", unexpected),
            ("not in the file", missing)) if keys)
        hint = "" if not loaded else "; arch.weights_strict=false loads the matching ones"
        raise ConfigError("arch.weights", spec, f"weights for this backbone; {path}: {counts} "
                          f"({detail}){hint}")
    module.load_state_dict(loaded, strict=False)
    log.info("arch.weights: loaded %s/%s tensors from %s", len(loaded), len(own), path)
    return {"weights": str(path), "weights_sha256": _sha256(path),
            "weights_loaded": len(loaded), "weights_strict": strict,
            "weights_missing": missing, "weights_unexpected": unexpected,
            "weights_reshaped": reshaped}


def freeze(module: nn.Module, how: str, last_block: list[nn.Module]) -> list[nn.Module]:
    """Switch off gradients (all, or all but ``last_block``); returns the BN layers now frozen."""
    if how not in FREEZE:
        raise ConfigError("arch.freeze", how, "one of " + ", ".join(FREEZE))
    if how == "none":
        return []
    for p in module.parameters():
        p.requires_grad_(False)
    for m in last_block if how == "all_but_last_block" else []:
        for p in m.parameters():
            p.requires_grad_(True)
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters())]


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f", ... ({len(keys)})" if len(keys) > 3 else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
