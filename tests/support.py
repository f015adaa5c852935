"""Plain helpers the test files share: composing conf/, the real CLI, the cluster, W&B, data files.

Fixtures and pytest hooks live in conftest.py; everything here is an ordinary import.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from ncsweep import data as D
from ncsweep.app import conf_dir
from ncsweep.config import register_resolvers, validate
from ncsweep.tracking import RunFolder

ROOT = Path(__file__).resolve().parents[1]
CONF = conf_dir()
FAST = ["logger=none", "trainer.progress=false"]
K = 10

register_resolvers()

T = TypeVar("T")


def tail(text: str | bytes | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a process's output, for a failure message."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


# ------------------------------------------------------------------------- composing and the CLI

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


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """The real ``python -m ncsweep`` in a subprocess; a run past ``timeout`` fails the test."""
    full_env = {**os.environ, "WANDB_ERROR_REPORTING": "false", "HYDRA_FULL_ERROR": "0",
                **(env or {})}
    try:
        return subprocess.run([sys.executable, "-m", "ncsweep", *args], cwd=cwd, text=True,
                              capture_output=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr
    pytest.fail(f"python -m ncsweep {' '.join(args)} did not exit within {timeout:.0f} s; "
                f"its stderr ends:\n{tail(stderr)}", pytrace=False)


_BESIDE = ThreadPoolExecutor(2)


def run_cli_beside(args: list[str], cwd: Path, timeout: float = 300
                   ) -> Future[subprocess.CompletedProcess]:
    """``run_cli`` in a background thread: a reference run beside the run a test checks, on
    the core that run leaves free."""
    return _BESIDE.submit(run_cli, args, cwd, timeout)


def exits_within(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """``proc.communicate()``; if ``proc`` is still running after ``timeout`` seconds it is
    killed and the test fails with ``what`` (the behaviour that did not happen)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"{what} (still running after {timeout:.0f} s); its stderr ends:\n"
                    f"{tail(err)}", pytrace=False)


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Poll ``check`` until it holds; after ``timeout`` seconds the test fails with ``what``
    (the state that was not reached)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout:.0f} s)", pytrace=False)
        time.sleep(every)


def returns_within(timeout: float, call: Callable[[], T], what: str) -> T:
    """``call()`` in a daemon thread: a hang fails the test with ``what`` after ``timeout``
    seconds instead of stalling the suite."""
    outcome: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as err:  # re-raised in the test's thread
            outcome.append((False, err))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        pytest.fail(f"{what} (no return after {timeout:.0f} s)", pytrace=False)
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def sweep_job_ids(sweep: Path) -> list[str]:
    """The scheduler job ids a sweep recorded in its job list."""
    lines = (sweep / ".ncsweep-jobs.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["job_id"] for line in lines})


def wait_for_rows(proc: subprocess.Popen, sweep: Path, pattern: str, rows: int,
                  timeout: float = 300) -> None:
    """Until a metrics file matching ``pattern`` in ``sweep`` holds ``rows`` rows; the sweep
    process must keep running meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = sorted(sweep.glob(pattern))
        if found and len(found[0].read_text().splitlines()) >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} with {rows} rows in {sweep} after {timeout} s")


# --------------------------------------------------------------------------- the local cluster

IN_CI = os.environ.get("CI", "").strip().lower() == "true"
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED", "REVOKED")


def sacct_state(job_id: str, *extra: str) -> str:
    """``State|ExitCode`` of a job as the accounting database has it."""
    res = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode", *extra],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def wait_sacct_final(ids: list[str], limit: float = 60) -> list[str]:
    """Each job's ``sacct_state``, polled until every one is final or ``limit`` s have passed
    (sacct lags the end of a job by 1-2 s)."""
    deadline = time.monotonic() + limit
    states = [sacct_state(i) for i in ids]
    while time.monotonic() < deadline and not all(s.startswith(FINAL_STATES) for s in states):
        time.sleep(0.5)
        states = [sacct_state(i) for i in ids]
    return states


# ---------------------------------------------------------------------------------- W&B server

API_KEY = "k" * 40


def get_json(url: str, timeout: float = 5) -> dict:
    """GET ``url`` and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def server_steps(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point the server stored for ``key``, in step order."""
    try:
        metrics = get_json(f"{url}/api/v2/runs/{run_id}/metrics?key={key}")["metrics"]
    except urllib.error.HTTPError:
        return []
    return sorted((int(m["step"]), float(m["value"])) for m in metrics)


def folder_steps(folder: RunFolder, key: str) -> list[tuple[int, float]]:
    """(epoch, value) of ``key`` in every eval row of the run folder."""
    return [(int(r["epoch"]), float(r[key])) for r in folder.read_metrics()]


def run_id_of(folder: RunFolder) -> str:
    """The W&B run id the run used, from its own record file ``run-<id>.wandb``."""
    ids = {p.name[len("run-"):-len(".wandb")] for p in folder.path.glob("wandb/*/run-*.wandb")}
    assert len(ids) == 1, ids
    return ids.pop()


def same_points(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, each once, and the same values (the server stores float64 of a float32)."""
    return ([s for s, _ in got] == [s for s, _ in expected]
            and [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6))


# ------------------------------------------------------------- image files in torchvision formats

def pattern_images(labels: np.ndarray, channels: int, side: int, seed: int) -> np.ndarray:
    """Learnable images: a bright square whose place says the class, on faint noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(labels.size, channels, side, side), dtype=np.uint8)
    step = side // 5
    for i, k in enumerate(labels):
        r, c = (k // 5) * 2 * step + 1, (k % 5) * step
        x[i, :, r:r + step, c:c + step] = 250
    return x


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def write_mnist(root: Path, per_class: int = 10, test_per_class: int = 3, gz: bool = False,
                folder: str = "MNIST") -> Path:
    """MNIST's IDX files (optionally gzipped) of pattern images; the raw folder."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n, seed in (("train", per_class, 0), ("t10k", test_per_class, 1)):
        labels = np.tile(np.arange(K), n).astype(np.uint8)
        images = pattern_images(labels, 1, 28, seed)[:, 0]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return raw


def write_cifar10(root: Path, per_class_per_batch: int = 1) -> Path:
    """CIFAR-10's pickled batches of pattern images; their folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        labels = np.tile(np.arange(K), per_class_per_batch)
        images = pattern_images(labels, 3, 32, seed).reshape(labels.size, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, "labels": labels.tolist(),
                         "batch_label": name}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(K)]}, f, protocol=2)
    return folder


def load(overrides: list[str]) -> D.DataBundle:
    """The configured builder, called outside Hydra's instantiate (which wraps its errors)."""
    cfg = compose_cfg(overrides)
    validate(cfg)
    return instantiate(cfg.dataset, _partial_=True)()


# A small deterministic MLP run and two local gloo ranks, for the rank tests.
DDP_MLP = ["logger=none", "trainer.progress=false", "trainer.deterministic=true", "seed=0",
       "arch.batch_norm=false", "arch.width=32", "trainer.batch_size=64", "trainer.epochs=6",
       "trainer.eval_every=2", "trainer.checkpoint_every=1", "name=ddp", "nc.layers=all"]
LOCAL_RANKS = ["launcher=local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.poll_s=0.5"]


def one_run_sweep(args: list[str], cwd: Path, name: str = "ddp") -> RunFolder:
    """Run a one-run sweep (``-m``) in its own folder ``cwd``; its run folder."""
    cwd.mkdir(parents=True, exist_ok=True)
    result = run_cli(["-m", *args], cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert ": 1 done" in result.stdout, result.stdout
    [summary] = (cwd / "multirun" / name).glob("*/summary.json")
    return RunFolder(summary.parent)


def assert_same_run(a: RunFolder, b: RunFolder, rtol: float) -> None:
    """Every metric of every eval row and every final weight agree to ``rtol`` relative."""
    rows_a, rows_b = a.read_metrics(), b.read_metrics()
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            assert rb[key] == pytest.approx(value, rel=rtol, abs=1e-12), (ra["epoch"], key)
    wa = torch.load(a.file("checkpoint.pt"), weights_only=True)["model"]
    wb = torch.load(b.file("checkpoint.pt"), weights_only=True)["model"]
    for name, tensor in wa.items():
        if tensor.is_floating_point():
            change = (wb[name].double() - tensor.double()).norm() / tensor.double().norm()
            assert change <= rtol, (name, change.item())


def assert_rank_zero_wrote_alone(ranks: RunFolder, reference: RunFolder) -> None:
    """A two-rank run's summary says so, trains as its one-process twin, and rank 0 alone
    wrote its folder (one log file, one Hydra record)."""
    summary = ranks.read_summary()
    assert summary["world_size"] == 2 and reference.read_summary()["world_size"] == 1
    assert summary["sync_batchnorm"] is False
    assert summary["train_acc"] == reference.read_summary()["train_acc"]
    assert sorted(p.name for p in ranks.path.iterdir() if p.suffix == ".log") == ["app.log"]
    assert (ranks.path / ".hydra" / "config.yaml").exists()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(script: str, out_dir: Path, timeout: float) -> None:
    """Run ``script RANK 2 PORT OUT_DIR`` as two real gloo ranks; fail with both logs if either
    rank fails or runs past ``timeout``."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")]),
                        "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, str(r), "2", str(port), str(out_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0].decode())
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs)


@contextmanager
def small_tmpfs(root: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. "6m") under ``root`` (needs root); the test is skipped with
    the reason where it cannot be mounted, and it is always unmounted."""
    mount_point = root / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine, so no small filesystem to fill")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                          str(mount_point)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def block_reference(h: np.ndarray, y: np.ndarray, h_test: np.ndarray, y_test: np.ndarray,
              k: int) -> dict[str, float]:
    """docs/metrics.md's per-block formulas (nc1, cdnv, trace_ratio, NCC accuracies on train and
    test against the train means) written out in numpy float64, for K = ``k`` classes."""
    n, d = h.shape
    mu = np.stack([h[y == c].mean(axis=0) for c in range(k)])
    dev = h - mu[y]
    sigma_w = dev.T @ dev / n
    m = mu - h.mean(axis=0)
    sigma_b = m.T @ m / k
    pinv = np.linalg.pinv(sigma_b, rcond=max(d, k) * np.finfo(np.float64).eps, hermitian=True)
    var = np.array([np.square(dev[y == c]).sum(axis=1).mean() for c in range(k)])
    cdnv = np.mean([(var[a] + var[b]) / (2 * np.square(mu[a] - mu[b]).sum())
                    for a in range(k) for b in range(a + 1, k)])

    def ncc(feats: np.ndarray, labels: np.ndarray) -> float:
        dist = np.square(feats[:, None, :] - mu[None]).sum(axis=2)
        return float((dist.argmin(axis=1) == labels).mean())

    return {"nc1": np.trace(sigma_w @ pinv) / k, "cdnv": cdnv,
            "trace_ratio": np.trace(sigma_w) / np.trace(sigma_b),
            "ncc_acc_train": ncc(h, y), "ncc_acc_test": ncc(h_test, y_test)}
