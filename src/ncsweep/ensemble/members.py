"""The members of an ensemble: each an admitted run's attempt, trained together."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ncsweep.diskspace import DiskFull
from ncsweep.ensemble.stepper import StackedStepper
from ncsweep.jobs import run_admitted
from ncsweep.lifecycle import Attempt, admit, root_cause, stopped_by_full_disk
from ncsweep.stopping import StopFlag
from ncsweep.tracking import CheckpointError, NoMirror, WandbMirror, jsonable
from ncsweep.training import FitResult, StopRequested

log = logging.getLogger(__name__)

Member = Attempt  # a member is an admitted run's attempt, as a solo run's is


def prepare(cfg: DictConfig) -> Attempt | dict:
    """A Hydra task that only admits the job: the member to train later, or its status dict."""
    return admit(cfg)


def run_group(members: Sequence[Attempt]) -> list[dict]:
    """Train the admitted members of one group together; a status dict for each, in order.

    Each member holds its own folder's lease from admission; all are let go at the end.
    """
    try:
        return _run_group(members)
    except DiskFull as err:
        return [m.status or stopped_by_full_disk(m.context, err) for m in members]
    finally:
        for m in members:
            m.release()


def _run_group(members: Sequence[Attempt]) -> list[dict]:
    """run_group's choice: stacked, or one after another where the members cannot stack."""
    if len(members) < 2 or members[0].plain["trainer"]["dry_run"]:
        return [run_admitted(m) for m in members]
    if any(m.plain["dataset"] != members[0].plain["dataset"] for m in members):
        log.info("ensemble of %d: the members' data differ (a seeded data set); training them "
                 "one after another", len(members))
        return [run_admitted(m) for m in members]
    states = []
    for m in members:
        try:
            states.append(m.folder.load_checkpoint(m.context.key) if m.resumes else None)
        except CheckpointError:
            return [run_admitted(m) for m in members]
    points = {None if s is None else (int(s["epoch"]), int(s["batch"]), int(s["step"]))
              for s in states}
    if len(points) > 1:
        log.info("ensemble of %d: the members' checkpoints stand at different points; training "
                 "them one after another", len(members))
        return [run_admitted(m) for m in members]
    return _train(list(members), states)


def _train(members: list[Attempt], states: list[dict | None]) -> list[dict]:
    """Build every member as its solo run, train them stacked, finish each folder."""
    for m in members:
        m.folder.write_run(m.identity)
    stop = StopFlag()
    stop.install()
    try:
        stepper = _build(members, states)
        log.info("ensemble: %d seeds (%s) as one batched model", len(members),
                 ", ".join(str(m.plain["seed"]) for m in members))
        results = stepper.trainer.run(
            stepper, lambda r, row: members[r].log_row(row),
            lambda r, state: members[r].save(state), stop,
            None if states[0] is None else states,
            lambda r, err: members[r].fail(err, traceback_named=False))
    except StopRequested:
        for m in members:
            if m.status is None:
                m.mirror.finish(exit_code=1)
                m.folder.record_attempt("interrupted")
            m.release()
        stop.hand_over()
    except Exception as err:
        err = root_cause(err)
        for m in members:
            if m.status is None:
                m.fail(err)
        return [m.status for m in members]
    finally:
        stop.restore()
    for m, result in zip(members, results, strict=True):
        if m.status is None:
            m.status = _finish(m, result)
    return [m.status for m in members]


def build_members(plains: Sequence[Mapping]) -> list[Any]:
    """Each member's parts exactly as its solo run builds them (``build_run`` after its seed),
    the data read once and shared."""
    from ncsweep.build import build_run

    runs = [build_run(plain, read_data=index == 0) for index, plain in enumerate(plains)]
    for run in runs[1:]:
        run.data = runs[0].data
    return runs


def _build(members: list[Attempt], states: list[dict | None]) -> StackedStepper:
    """Each member's folder, parts (exactly its solo run's, data read once) and W&B run."""
    for m in members:
        m.set_up()
    runs = build_members([m.plain for m in members])
    for m, run, state in zip(members, runs, states, strict=True):
        m.begin(run, len(members))
        m.resume_from(state)
    for m in members:
        m.start_mirror(_concurrent(m.run.logger))
    return StackedStepper(runs, [m.plain["seed"] for m in members], members[0].plain,
                          runs[0].trainer.measure)


def _finish(m: Attempt, result: FitResult) -> dict:
    """Write one member's summary, run files and DONE exactly as a solo run does."""
    m.finish(result)
    m.folder.record_attempt("done")
    log.info("%s: done (ensemble member); results in %s", m.context.key, m.folder.path)
    return {"status": "done", "dir": str(m.folder.path)}


class ConcurrentMirror(WandbMirror):
    """A W&B mirror whose run lives beside the other members' runs in this process."""

    def _init(self, wandb: Any, mode: str, run_dir: Path, run_id: str, name: str, group: str,
              config: Any, settings: dict) -> Any:
        return wandb.init(
            project=self.project, entity=self.entity, mode=mode, tags=self.tags,
            dir=str(run_dir), id=run_id, name=name, group=group, resume="allow",
            config=jsonable(config), reinit="create_new", settings=wandb.Settings(**settings))


def _concurrent(mirror: WandbMirror) -> WandbMirror:
    if isinstance(mirror, NoMirror) or type(mirror) is not WandbMirror:
        return mirror
    return ConcurrentMirror(mirror.project, mirror.entity, mirror.mode, mirror.tags)
