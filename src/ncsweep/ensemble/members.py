"""The members of an ensemble: admission, building, training them together, their results."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ncsweep.ensemble.stacked import EnsembleFit
from ncsweep.errors import ConfigError
from ncsweep.tracking import CheckpointError, NoMirror, WandbMirror

log = logging.getLogger(__name__)


OPTIMIZERS = {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.AdamW": "adamw"}
ARCHS = {"ncsweep.models.MLP": "mlp", "ncsweep.models.UFMFeatures": "ufm"}
HEADS = ("ncsweep.heads.LearnedHead", "ncsweep.heads.ETFHead")
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
    if arch.get("_target_") not in ARCHS:
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
    if plain["head"].get("_target_") not in HEADS:
        raise ConfigError("head", plain["head"].get("_target_"), f"learned or etf {WITH}")
    if plain["loss"].get("_target_") not in LOSSES:
        raise ConfigError("loss", plain["loss"].get("_target_"), f"ce or mse {WITH}")


@dataclass
class Member:
    """One admitted job of a group: its config, context and the Hydra runtime it ran under."""

    cfg: DictConfig
    plain: dict
    context: Any
    identity: dict
    hydra: DictConfig
    run: Any = None
    mirror: Any = None
    state: dict | None = None
    summary: dict = field(default_factory=dict)
    attempts: int = 1
    earlier_wall: float = 0.0
    status: dict | None = None

    def activate(self) -> None:
        """Make this member's Hydra runtime the current one (``${hydra:...}``, JobContext)."""
        HydraConfig.instance().cfg = self.hydra


def prepare(cfg: DictConfig) -> Member | dict:
    """A Hydra task that only admits the job: the member to train later, or its status dict."""
    from ncsweep.jobs import admit

    admitted = admit(cfg)
    if isinstance(admitted, dict):
        return admitted
    context, identity, plain = admitted
    return Member(cfg, plain, context, identity, copy.deepcopy(HydraConfig.instance().cfg))


def run_group(members: Sequence[Member]) -> list[dict]:
    """Train the admitted members of one group together; a status dict for each, in order."""
    if len(members) < 2 or members[0].plain["trainer"]["dry_run"]:
        return [_solo(m) for m in members]
    if any(m.plain["dataset"] != members[0].plain["dataset"] for m in members):
        log.info("ensemble of %d: the members' data differ (a seeded data set); training them "
                 "one after another", len(members))
        return [_solo(m) for m in members]
    for m in members:
        if m.plain["trainer"]["resume"] != "never":
            try:
                m.state = m.context.folder.load_checkpoint(m.context.key)
            except CheckpointError:
                return [_solo(m) for m in members]
    points = {None if m.state is None else (int(m.state["epoch"]), int(m.state["batch"]),
                                            int(m.state["step"])) for m in members}
    if len(points) > 1:
        log.info("ensemble of %d: the members' checkpoints stand at different points; training "
                 "them one after another", len(members))
        return [_solo(m) for m in members]
    return _train(list(members))


def _solo(member: Member) -> dict:
    from ncsweep.jobs import run_job

    member.activate()
    return run_job(member.cfg)


def _train(members: list[Member]) -> list[dict]:
    """Build every member as its solo run, train them stacked, finish each folder."""
    from ncsweep.jobs import USER_ERRORS, _fail, _root_cause
    from ncsweep.stopping import StopFlag
    from ncsweep.training import StopRequested

    started = time.perf_counter()
    for m in members:
        m.activate()
        m.context.folder.write_run(m.identity)
    stop = StopFlag()
    stop.install()
    try:
        _build(members)
        log.info("ensemble: %d seeds (%s) as one batched model", len(members),
                 ", ".join(str(m.plain["seed"]) for m in members))
        results = EnsembleFit(members, started).fit(stop)
    except StopRequested:
        for m in members:
            if m.status is None:
                m.mirror.finish(exit_code=1)
                m.context.folder.record_attempt("interrupted")
        stop.hand_over()
    except Exception as err:
        err = _root_cause(err)
        for m in members:
            if m.status is None:
                if m.mirror is not None:
                    m.mirror.finish(exit_code=1)
                line = (f"error: {err}" if isinstance(err, USER_ERRORS) else
                        f"{m.context.key} FAILED: {type(err).__name__}: {err} (traceback in "
                        f"{m.context.folder.file('FAILED')})")
                m.status = _fail(m.context, err, line)
        return [m.status for m in members]
    finally:
        stop.restore()
    for m, result in zip(members, results, strict=True):
        if m.status is None:
            m.status = _finish(m, result, started)
    return [m.status for m in members]


def build_members(configs: Sequence[tuple[DictConfig, dict]],
                  before: Callable[[int], None] = lambda index: None) -> list[Any]:
    """Each member's parts exactly as its solo run builds them (``build_run`` after its seed),
    the data read once and shared; ``before(i)`` runs ahead of member i's build."""
    from ncsweep.build import build_run

    runs = []
    for index, (cfg, plain) in enumerate(configs):
        before(index)
        runs.append(build_run(cfg, plain, read_data=index == 0))
    for run in runs[1:]:
        run.data = runs[0].data
    return runs


def _build(members: list[Member]) -> None:
    """Each member's folder, parts (exactly its solo run's, data read once) and W&B run."""
    from ncsweep.jobs import summary_head

    for m in members:
        if m.plain["trainer"]["resume"] == "never":
            m.context.folder.reset()
        else:
            m.context.folder.prepare()
    runs = build_members([(m.cfg, m.plain) for m in members],
                         lambda index: members[index].activate())
    for m, run in zip(members, runs, strict=True):
        folder = m.context.folder
        m.run = run
        trainer_cfg = m.plain["trainer"]
        m.summary = summary_head(m.identity, trainer_cfg, len(members))
        folder.write_config(m.plain)
        folder.keep_metrics([r for r in folder.read_metrics()
                             if m.state is not None and r["epoch"] <= m.state["epoch"]])
        if m.state is not None:
            m.earlier_wall = float(m.state.get("wall_time_s", 0.0))
            m.attempts = int(m.state.get("attempts", 1)) + 1
    for m in members:
        m.summary.update(m.run.describe())
        m.mirror = _concurrent(m.run.logger)
        m.mirror.start(m.context.folder.path, m.context.wandb_id, m.context.key, m.context.name,
                       m.plain, quiet=not m.plain["trainer"]["progress"])


def _finish(m: Member, result: Any, started: float) -> dict:
    """Write one member's summary, run files and DONE exactly as a solo run does."""
    from ncsweep.jobs import finish_run

    folder = m.context.folder
    summary = m.summary
    finish_run(folder, m.run, summary, result, m.state, started, m.earlier_wall, m.attempts)
    folder.write_summary(summary)
    m.mirror.finish(summary)
    folder.mark_done()
    folder.record_attempt("done")
    log.info("%s: done (ensemble member); results in %s", m.context.key, folder.path)
    return {"status": "done", "dir": str(folder.path)}


class ConcurrentMirror(WandbMirror):
    """A W&B mirror whose run lives beside the other members' runs in this process."""

    def _init(self, wandb: Any, mode: str, run_dir: Path, run_id: str, name: str, group: str,
              config: Any, settings: dict) -> Any:
        from ncsweep.tracking import _jsonable

        return wandb.init(
            project=self.project, entity=self.entity, mode=mode, tags=self.tags,
            dir=str(run_dir), id=run_id, name=name, group=group, resume="allow",
            config=_jsonable(config), reinit="create_new", settings=wandb.Settings(**settings))


def _concurrent(mirror: WandbMirror) -> WandbMirror:
    if isinstance(mirror, NoMirror) or type(mirror) is not WandbMirror:
        return mirror
    return ConcurrentMirror(mirror.project, mirror.entity, mirror.mode, mirror.tags)


