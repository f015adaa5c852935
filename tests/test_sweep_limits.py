"""A sweep within the scheduler's limits: arrays split at MaxArraySize, runs packed to fit a job
limit, a limit nothing meets refused in one line, the limits read from the real local cluster."""

from __future__ import annotations

import pytest

from ncsweep.cluster import ClusterError
from ncsweep.launcher.limits import Limits, describe, fit, read_limits, split
from ncsweep.launcher.plan import Job, pack

RULE = "QOS normal's MaxSubmitJobsPerUser 500 (100 queued now)"


def units(runs: int, ensemble: int = 1) -> list[list[Job]]:
    return [[Job((f"seed={i + k}",), i + k, f"/tmp/r{i + k}") for k in range(ensemble)]
            for i in range(0, runs, ensemble)]


def test_a_sweep_past_max_array_size_is_split_into_full_arrays_and_the_rest() -> None:
    limits = Limits(max_array_size=1001)
    sizes = split(10_000, limits)
    assert sizes == [1001] * 9 + [991] and sum(sizes) == 10_000
    assert describe(1, 1, sizes, limits) == (
        "split into 10 arrays of up to 1001 tasks (MaxArraySize 1001)")
    assert split(1001, limits) == [1001] and describe(1, 1, [1001], limits) == ""
    assert split(5, Limits()) == [5]


def test_runs_are_packed_to_fit_a_job_limit_and_ensembles_stay_whole() -> None:
    limits = Limits(1001, max_tasks=400, task_rule=RULE)
    assert fit(units(400), 1, limits) == 1
    assert fit(units(1200), 1, limits) == 3 and len(pack(units(1200), 3)) == 400
    assert fit(units(1200), 4, limits) == 4
    assert fit(units(1200, ensemble=4), 1, limits) == 1  # 300 ensembles, 300 tasks
    per_task = fit(units(2000, ensemble=4), 1, limits)
    packed = pack(units(2000, ensemble=4), per_task)
    assert per_task == 8 and len(packed) == 250 and all(len(u) == 4 for t in packed for u in t)
    line = describe(1, 3, [400], limits)
    assert line == f"runs packed to stay within {RULE}"


def test_a_limit_nothing_meets_is_one_line() -> None:
    with pytest.raises(ClusterError) as err:
        fit(units(3), 1, Limits(1001, max_tasks=0, task_rule=RULE))
    assert "\n" not in str(err.value) and RULE in str(err.value)
    with pytest.raises(ClusterError, match="MaxArraySize 0"):
        split(3, Limits(max_array_size=0))


@pytest.mark.slurm
def test_the_local_clusters_limits_are_read(local_slurm: str) -> None:
    limits = read_limits()
    assert limits.max_array_size == 1001
    assert limits.max_tasks is not None and 0 < limits.max_tasks <= 5000
    assert limits.task_rule.startswith("MaxJobCount 10000")
