"""Shared fixtures: compose the real configs, run real jobs in-process or through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ncsweep.app import conf_dir
from ncsweep.config import register_resolvers, run_key

ROOT = Path(__file__).resolve().parents[1]
CONF = conf_dir()
FAST = ["logger=none", "trainer.progress=false"]

register_resolvers()


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose conf/ as the app would, with Hydra's runtime fields set for one run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.override_dirname = ",".join(sorted(overrides))
        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def job_runner(tmp_path: Path) -> Iterator:
    """Run one real job in-process from overrides; returns (run dir, summary)."""
    from ncsweep.jobs import run_job

    def run(overrides: list[str], folder: str | None = None) -> tuple[Path, dict]:
        out = tmp_path / (folder or run_key(",".join(sorted(overrides))))
        cfg = compose_cfg(overrides, out)
        run_job(cfg)
        return out, json.loads((out / "summary.json").read_text())

    yield run
    GlobalHydra.instance().clear()


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The real ``python -m ncsweep`` in a subprocess."""
    full_env = {**os.environ, "WANDB_ERROR_REPORTING": "false", "HYDRA_FULL_ERROR": "0",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "ncsweep", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=full_env)
