"""Config resolution and validation: ``dim=K``-style feature dimensions, run keys, one-line errors.

Imports nothing heavy, so ``--help``, ``--cfg`` and config errors never pay for torch.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from ncsweep.capabilities import capability
from ncsweep.errors import ConfigError
from ncsweep.keys import override_values, parse_override

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

DIM_PATTERN = re.compile(r"^\s*(?:(\d+)\s*\*?\s*)?K\s*(?:([+-])\s*(\d+))?\s*$")
DIM_ALLOWED = "a positive integer or a K-expression such as K, K-1, K+1, 2K"
RESUME_CHOICES = ("auto", "never", "must")
NONFINITE_CHOICES = ("fail", "ignore")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
RUN_KEY_MAX = 96
RUN_KEY_SUBDIR = "${ncsweep.key:${hydra.job.override_dirname}}"
"""conf/'s ``hydra.sweep.subdir``: a job's folder is the run key of its overrides."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
__all__ = ["ConfigError", "check_device", "check_overrides", "closest", "command_overrides",
           "read_override", "register_resolvers", "resolve_dim", "run_key", "validate"]


def resolve_dim(value: Any, num_classes: int) -> int:
    """Turn ``dim`` (an int, ``K``, ``K-1``, ``2K``, ...) into the feature dimension d >= 1."""
    if isinstance(value, bool):
        raise ConfigError("dim", value, DIM_ALLOWED)
    if isinstance(value, int):
        dim = value
    else:
        text = str(value).strip()
        if text.isdigit():
            dim = int(text)
        else:
            match = DIM_PATTERN.match(text)
            if match is None:
                raise ConfigError("dim", value, DIM_ALLOWED)
            factor, sign, offset = match.groups()
            dim = int(factor or 1) * int(num_classes)
            if sign:
                dim += int(offset) if sign == "+" else -int(offset)
    if dim < 1:
        raise ConfigError("dim", value, f"{DIM_ALLOWED} (it resolves to {dim} at K={num_classes})")
    return dim


def check_dim_syntax(value: str) -> None:
    """Reject a ``dim`` override that no K could make valid, before anything is composed."""
    if value.strip().lstrip("-").isdigit():
        if int(value) < 1:
            raise ConfigError("dim", value, DIM_ALLOWED)
        return
    if DIM_PATTERN.match(value) is None:
        raise ConfigError("dim", value, DIM_ALLOWED)


def run_key(override_dirname: str) -> str:
    """A filesystem- and W&B-safe name for a job, derived from its overrides."""
    if not override_dirname:
        return "default"
    safe = _UNSAFE.sub("_", override_dirname).strip("._")
    if len(safe) <= RUN_KEY_MAX and safe == override_dirname:
        return safe
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{safe[: RUN_KEY_MAX - 9]}-{digest}"


def register_resolvers() -> None:
    """Register the ``ncsweep.*`` interpolations used by conf/ (idempotent)."""
    for name, fn in (("ncsweep.dim", resolve_dim), ("ncsweep.key", run_key)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _positive(cfg: Mapping, key: str, allow_zero: bool = False) -> None:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return
        node = node[part]
    bad = isinstance(node, bool) or not isinstance(node, (int, float)) or node < 0
    if bad or (node == 0 and not allow_zero):
        allowed = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(key, node, allowed)


def _choice(cfg: Mapping, key: str, choices: tuple[str, ...]) -> None:
    section, _, leaf = key.rpartition(".")
    node = cfg.get(section, {}) if section else cfg
    if leaf in node and node[leaf] not in choices:
        raise ConfigError(key, node[leaf], "one of " + ", ".join(choices))


def validate(cfg: Any) -> dict:
    """Resolve the whole config and check it; returns it as a plain dict or raises ConfigError."""
    _check_pairing(cfg)
    try:
        plain = {str(k): OmegaConf.to_container(cfg[k], resolve=True)
                 if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError("config", str(err).splitlines()[0], "a config that resolves") from None
    num_classes = plain["dataset"]["num_classes"]
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError("dataset.num_classes", num_classes, "an integer >= 2")
    head = plain["head"]
    if capability(head, "frozen", False) and plain["feature_dim"] < num_classes - 1:
        raise ConfigError(
            "dim",
            plain["dim"],
            f"with head=etf, d >= K-1 = {num_classes - 1} (d = {plain['feature_dim']} "
            "has no simplex ETF)",
        )
    _check_ufm(plain)
    for key in ("trainer.epochs", "trainer.eval_every"):
        _positive(plain, key, allow_zero=key == "trainer.epochs")
    _positive(plain, "optim.lr")
    for key in ("optim.weight_decay", "optim.momentum"):
        _positive(plain, key, allow_zero=True)
    batch_size = plain["trainer"].get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError("trainer.batch_size", batch_size,
                          "a positive integer, or null for full batch")
    _choice(plain, "trainer.resume", RESUME_CHOICES)
    _choice(plain, "trainer.on_nonfinite", NONFINITE_CHOICES)
    device = plain["trainer"].get("device", "auto")
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ConfigError("trainer.device", device, "auto, cpu, cuda, cuda:N or mps")
    check_device(device)
    seed = plain.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", seed, "an integer")
    return plain


def check_device(device: str) -> None:
    """A named accelerator must exist on this machine, checked before any model is built."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.device", device, "no MPS device here; auto or cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        allowed = (f"this machine has {count} CUDA device(s); auto, cpu, cuda or cuda:N with "
                   f"N < {count}" if count else "no CUDA device here; auto or cpu")
        raise ConfigError("trainer.device", device, allowed)


def _is_ufm(cfg: Any) -> bool:
    return capability(cfg["arch"], "kind") == "ufm"


def _check_pairing(cfg: Any) -> None:
    """arch=ufm needs dataset=ufm and back; checked before interpolations that rely on it."""
    dataset = cfg["dataset"].get("name")
    if _is_ufm(cfg) != (dataset == "ufm"):
        key, value = ("arch", "ufm") if _is_ufm(cfg) else ("dataset", dataset)
        raise ConfigError(key, value, "arch=ufm and dataset=ufm go together "
                          "(experiment=ufm sets both)")


def _check_ufm(plain: Mapping) -> None:
    """The UFM's objective is exactly docs/metrics.md's: its lambdas, no extra weight decay."""
    if _is_ufm(plain):
        decay = plain["optim"].get("weight_decay", 0.0)
        if decay:
            raise ConfigError("optim.weight_decay", decay,
                              "0 with arch=ufm (arch.lambda_w/lambda_h/lambda_b regularise it)")
        for key in ("lambda_w", "lambda_h"):
            _positive(plain, f"arch.{key}")
        _positive(plain, "arch.lambda_b", allow_zero=True)


def check_overrides(args: list[str], conf_dir: Path) -> None:
    """Check group choices and ``dim`` on the command line against conf/, before Hydra runs."""
    for override in command_overrides(args):
        key = override.key_or_group
        group = conf_dir / key
        not_a_choice = override.is_add() or override.is_force_add() or override.is_delete()
        if not_a_choice or key.startswith("hydra") or not (key == "dim" or group.is_dir()):
            continue
        values = override_values(override)
        if values is None:
            continue
        if key == "dim":
            for item in values:
                check_dim_syntax(item)
        elif group.is_dir() and "." not in key:
            options = group_options(group)
            for item in values:
                if item not in options and item != "null":
                    allowed = "one of " + ", ".join(options) + closest(item, options)
                    raise ConfigError(key, item, allowed)


def closest(name: str, names: list[str]) -> str:
    """`` (did you mean x?)`` naming the nearest of ``names`` to a mistyped ``name``, or ''."""
    scored = sorted(((difflib.SequenceMatcher(None, name, n).ratio(), n) for n in set(names)),
                    reverse=True)
    best = scored[0][0] if scored else 1.0
    close = [n for score, n in scored[:3] if score >= max(0.6, best - 0.05)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def command_overrides(args: list[str]) -> list[Override]:
    """The ``key=value`` overrides of a command line, parsed by Hydra (flags left out)."""
    return [read_override(arg) for arg in args if "=" in arg and not arg.startswith("-")]


def read_override(arg: str) -> Override:
    """A command-line override parsed by Hydra, or a one-line ConfigError naming it."""
    from hydra.errors import HydraException

    try:
        return parse_override(arg)
    except HydraException as err:
        reason = str(err).splitlines()[-1] if str(err) else type(err).__name__
        raise ConfigError("override", arg, f"key=value in Hydra's override grammar ({reason})"
                          ) from None


def group_options(group: Path) -> list[str]:
    """The choices of a config group: its top-level files, not the bases they build on.

    Shared bases live in sub-folders (``dataset/base/image.yaml``) or start with ``_``; they
    are included through a choice's ``defaults`` list, never chosen on their own.
    """
    return sorted(p.stem for p in group.glob("*.yaml") if not p.stem.startswith("_"))
