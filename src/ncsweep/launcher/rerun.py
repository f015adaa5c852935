"""A sweep launched again: runs already done or held by a live job are not submitted twice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from ncsweep import lease
from ncsweep.diskspace import DiskFull
from ncsweep.launcher.hydra_compat import job_return
from ncsweep.launcher.overrides import parse
from ncsweep.launcher.plan import Job, Unit
from ncsweep.tracking import RunFolder

log = logging.getLogger(__name__)

RERUN_KEYS = ("trainer.resume", "trainer.dry_run")
ELSEWHERE = "running elsewhere"


@dataclass
class Settled:
    """The runs a launch leaves alone: finished ones, and those a live job holds."""

    done: dict[int, Job] = field(default_factory=dict)
    held: dict[int, tuple[Job, lease.Holder]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.done or self.held)

    def keeps(self, unit: Unit) -> bool:
        """Whether a unit still has a run to submit (an ensemble goes whole or not at all)."""
        return any(run.num not in self.done and run.num not in self.held for run in unit)

    def line(self, kind: str, submitting: int) -> str:
        """The one line that says what is already done, queued or running, and what is left."""
        queued = sum(h.reserved for _, h in self.held.values())
        parts = [f"{len(self.done)} run(s) already done"] if self.done else []
        if self.held:
            example = next(iter(self.held.values()))
            parts.append(f"{len(self.held)} already queued or running ({queued} queued; e.g. "
                         f"{Path(example[0].folder).name} {example[1].describe()})")
        rest = f"submitting the other {submitting}" if submitting else "nothing to submit"
        return f"{kind}: {', '.join(parts)}; {rest}"

    def returns(self) -> dict[int, JobReturn]:
        """One result per run left alone, recorded in a finished run's folder as skipped."""
        results: dict[int, JobReturn] = {}
        for num, run in self.done.items():
            RunFolder(run.folder).record_attempt("skipped")
            results[num] = job_return(run.overrides, {"status": "skipped", "dir": run.folder})
        for num, (run, holder) in self.held.items():
            results[num] = job_return(run.overrides, {"status": ELSEWHERE, "dir": run.folder,
                                                      "holder": holder.describe()})
        return results


def skips_done(config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> bool:
    """Whether a finished run may be left out before submitting: its own job would skip it."""
    if OmegaConf.select(config, "trainer.resume", default=None) == "never":
        return False
    if OmegaConf.select(config, "trainer.dry_run", default=False):
        return False
    return not any(o.key_or_group in RERUN_KEYS for overrides in job_overrides
                   for o in parse(overrides))


def settle(config: DictConfig, job_overrides: Sequence[Sequence[str]],
           units: Sequence[Unit]) -> Settled:
    """The runs not to submit: done (where resuming skips them) or held by a live holder."""
    runs = [run for unit in units for run in unit]
    settled = Settled()
    if skips_done(config, job_overrides):
        settled.done = {run.num: run for run in runs if RunFolder(run.folder).status == "done"}
    open_runs = {Path(run.folder): run for run in runs if run.num not in settled.done}
    for folder, holder in lease.holders(open_runs).items():
        run = open_runs[folder]
        settled.held[run.num] = (run, holder)
    for unit in units:
        if len(unit) > 1 and settled.keeps(unit):
            for run in unit:
                settled.done.pop(run.num, None)
                settled.held.pop(run.num, None)
    return settled


def reserve(jobs: Sequence[object], tasks: Sequence[list[Unit]]) -> None:
    """Mark each submitted run's folder as held by its array task until that task takes it."""
    for job, task in zip(jobs, tasks, strict=True):
        for run in (run for unit in task for run in unit):
            try:
                lease.reserve(run.folder, str(job.job_id))  # type: ignore[attr-defined]
            except lease.RunHeld:
                continue  # the task started first and holds its run already
            except (lease.LeaseError, DiskFull, OSError) as err:
                log.warning("could not mark %s as queued in job %s: %s", run.folder,
                            job.job_id, err)  # type: ignore[attr-defined]
