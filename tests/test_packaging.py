"""The package finds conf/ from any working directory, also when installed from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import ROOT


def test_wheel_ships_conf_and_the_app_runs_from_it(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("ncsweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ncsweep/conf/config.yaml" in names and "ncsweep/conf/head/etf.yaml" in names
    assert {"hydra_plugins/ncsweep_launcher/ncsweep_launcher.py",
            "hydra_plugins/ncsweep_sweeper/ncsweep_sweeper.py"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    shown = subprocess.run([sys.executable, "-m", "ncsweep", "dim=K-1", "head=etf", "--cfg",
                            "job"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "feature_dim: 9" in shown.stdout and "ETFHead" in shown.stdout
    located = subprocess.run([sys.executable, "-c", "import ncsweep.app as a; print(a.conf_dir())"],
                             cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert located.stdout.strip() == str(site / "ncsweep" / "conf")
