"""Pretrained weights from local files: ncsweep never downloads them."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")
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


def load_matching_weights(module: nn.Module, spec: str) -> dict[str, list[str]]:
    """Load every tensor of a state dict whose name and shape match; report the rest.

    Accepts a plain state dict, one under ``state_dict`` or ``model`` (an ncsweep checkpoint:
    ``backbone.`` prefixes are stripped), and DataParallel's ``module.`` prefixes.
    """
    path = resolve_weights(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": sorted(loaded),
        "skipped_shape": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        "unused": sorted(k for k in state if k not in own),
        "kept_init": sorted(k for k in own if k not in loaded),
    }
    module.load_state_dict(loaded, strict=False)

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f", ... ({len(keys)})" if len(keys) > 4 else "")

    note = f"arch.weights: loaded {len(loaded)}/{len(own)} tensors from {path}"
    if report["skipped_shape"]:
        note += f"; skipped (shape differs): {names(report['skipped_shape'])}"
    if report["unused"]:
        note += f"; not in this model: {names(report['unused'])}"
    if report["kept_init"]:
        note += f"; left at init: {names(report['kept_init'])}"
    log.info("%s", note)
    return report
