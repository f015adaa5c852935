"""The local cluster's node gets the machine's CPUs, whatever the caller's OpenMP settings say."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slurm


def test_the_node_has_the_machines_cpus_when_started_under_omp_num_threads_1(
        local_slurm: str) -> None:
    # conftest sets OMP_NUM_THREADS=1 before the fixture starts the cluster (GNU nproc reads it)
    assert os.environ.get("OMP_NUM_THREADS") == "1"
    started = subprocess.run(["bash", str(ROOT / "launch" / "local_slurm.sh"), "start"],
                             capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"})
    assert started.returncode == 0, started.stderr[-2000:]
    machine = len(os.sched_getaffinity(0))
    node = re.search(r"^NodeName=.* CPUs=(\d+) ", Path(local_slurm).read_text(), re.M)
    assert node is not None and int(node.group(1)) == machine
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True,
                           timeout=30, check=True)
    assert [int(c) for c in sinfo.stdout.split()] == [machine]
