"""What can train as a batched ensemble, read from the classes the config names."""

from __future__ import annotations

from ncsweep.capabilities import capability
from ncsweep.errors import ConfigError

OPTIMIZERS = {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.AdamW": "adamw"}
KINDS = ("mlp", "ufm")
LOSSES = ("ncsweep.losses.CrossEntropy", "ncsweep.losses.HalfSquaredError")
WITH = "with trainer.ensemble=true"


def check_supported(plain: dict) -> None:
    """Refuse in one line what cannot train as a batched ensemble."""
    optim = plain["optim"].get("_target_", "")
    if optim not in OPTIMIZERS:
        name = optim.rsplit(".", 1)[-1].lower()
        raise ConfigError("optim", name, f"sgd, adam or adamw {WITH} (elementwise optimisers; "
                          "a line search couples a member's steps)")
    arch = plain["arch"]
    if capability(arch, "kind") not in KINDS:
        name = arch.get("_target_", "").rsplit(".", 1)[-1].lower()
        raise ConfigError("arch", name, f"mlp or ufm {WITH} (convolutional backbones have no "
                          "batched kernels here)")
    if arch.get("freeze", "none") != "none":
        raise ConfigError("arch.freeze", arch["freeze"], f"none {WITH}")
    if arch.get("compile"):
        raise ConfigError("arch.compile", arch["compile"], f"false {WITH}")
    if arch.get("starts") is not None:
        raise ConfigError("arch.starts", arch["starts"], f"null {WITH} (batched starts are "
                          "one batched run already)")
    if not isinstance(capability(plain["head"], "frozen"), bool):
        raise ConfigError("head", plain["head"].get("_target_"), f"learned or etf {WITH}")
    if plain["loss"].get("_target_") not in LOSSES:
        raise ConfigError("loss", plain["loss"].get("_target_"), f"ce or mse {WITH}")
