"""Submitting a sweep and watching it: preflight, one submission, a live line, clean endings.

Used by the ``ncsweep_basic`` / ``ncsweep_local`` / ``ncsweep_slurm`` Hydra launchers.
Whatever happens to a job (done, failed, cancelled, killed), the sweep ends in ncsweep's
summary line, never a traceback; submission problems are one line and exit 2 with nothing
submitted. ``compose`` gives each job its config (value-only siblings derived, not composed
again), ``plan`` groups and packs the runs, ``submit`` checks and submits them, ``watch``
follows them to the end, ``tasks`` runs them inside a task.
"""

from ncsweep.launcher.plan import AUTO_DEFAULTS, JOBS_FILE
from ncsweep.launcher.submit import _preflight, launch
from ncsweep.launcher.tasks import launch_basic, run_in_job

__all__ = ["AUTO_DEFAULTS", "JOBS_FILE", "_preflight", "launch", "launch_basic", "run_in_job"]
