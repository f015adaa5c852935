"""Submitting a sweep and watching it: preflight, one submission, a live line, clean endings.

Used by the ``ncsweep_basic`` / ``ncsweep_local`` / ``ncsweep_slurm`` Hydra launchers, which
hand it a :class:`~ncsweep.launcher.spec.Sweep`. Whatever happens to a job (done, failed,
cancelled, killed), the sweep ends in ncsweep's summary line, never a traceback; submission
problems are one line and exit 2 with nothing submitted. ``compose`` gives each job its config
(value-only siblings derived, not composed again), ``plan`` groups and packs the runs, ``submit``
checks and submits them with one frozen ``TaskSpec`` per sweep, ``watch`` follows them to the
end, ``tasks`` runs them inside a task, ``hydra_compat`` holds every private Hydra name used.
Hydra imports the plugins at start-up, so this package imports nothing heavy (torch) itself.
"""

from ncsweep.launcher.plan import AUTO_DEFAULTS, JOBS_FILE

__all__ = ["AUTO_DEFAULTS", "JOBS_FILE"]
