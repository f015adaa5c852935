"""One run across ranks: real gloo processes through submitit (local and the local cluster)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ncsweep.config import validate
from ncsweep.data import ImageView
from ncsweep.errors import ConfigError
from ncsweep.launcher.plan import ranks
from ncsweep.tracking import RunFolder
from ncsweep.training import Trainer, check_global_batch
from tests.support import (
    DDP_MLP as MLP,
)
from tests.support import (
    LOCAL_RANKS,
    assert_rank_zero_wrote_alone,
    assert_same_run,
    compose_cfg,
    one_run_sweep,
    sacct_state,
    sweep_job_ids,
    wait_for_rows,
)

pytestmark = pytest.mark.distributed

SLURM_RANKS = ["launcher=slurm", "hydra.launcher.tasks_per_node=2",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=null",
               "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30",
               "hydra.launcher.max_num_timeout=3", "hydra.launcher.poll_s=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunFolder]:
    """The MLP's one-process run and its two-rank (launcher=local) twin, same global batch,
    side by side (the UFM's pair is test_ufm_runs')."""
    root = tmp_path_factory.mktemp("ranks")
    cases = {"mlp/1": MLP, "mlp/2": [*MLP, *LOCAL_RANKS]}
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda case: one_run_sweep(cases[case], root / case), cases)
        return dict(zip(cases, done, strict=True))


def test_two_local_ranks_equal_one_process(runs: dict[str, RunFolder]) -> None:
    reference, ranks = runs["mlp/1"], runs["mlp/2"]
    assert_same_run(reference, ranks, rtol=1e-6)
    blocks = {k for k in ranks.read_metrics()[-1] if k.startswith("layers")}
    assert len(blocks) == 3 * 5 + 2, sorted(blocks)
    assert_rank_zero_wrote_alone(ranks, reference)


@pytest.mark.slurm
def test_two_ranks_on_the_cluster_resume_a_preemption_bitwise(
        local_slurm: str, runs: dict[str, RunFolder], tmp_path: Path) -> None:
    """Preempted and resumed on the cluster: bitwise the uninterrupted two-rank run."""
    plain = runs["mlp/2"]
    root = tmp_path / "preempted"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep", "-m", *MLP, *SLURM_RANKS],
                            cwd=root, env={**os.environ, "WANDB_ERROR_REPORTING": "false"},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sweep_dir = root / "multirun" / "ddp"
    wait_for_rows(proc, sweep_dir, "*/metrics.jsonl", 2, timeout=200)
    [job_id] = sweep_job_ids(sweep_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert ": 1 done" in out, out
    history = sacct_state(job_id, "--duplicates")
    assert "REQUEUED" in history or "PREEMPTED" in history, history
    [summary] = sweep_dir.glob("*/summary.json")
    resumed = RunFolder(summary.parent)
    assert resumed.read_summary()["resumed_from_epoch"] >= 1
    assert resumed.read_summary()["attempts"] == 2
    assert resumed.read_metrics() == plain.read_metrics()
    assert_same_run(runs["mlp/1"], resumed, rtol=1e-6)
    a = torch.load(plain.file("checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(resumed.file("checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rank_settings_are_checked() -> None:
    assert ranks({"tasks_per_node": 4, "nodes": 2}, "slurm", 1, [[1]]) == 8
    for params, key in (({"rank_timeout_s": 0}, "rank_timeout_s"),
                        ({"tasks_per_node": 0}, "tasks_per_node"),
                        ({"tasks_per_node": 2}, "trainer.ensemble")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            ranks(params, "slurm", 1, [[1, 2]])


def test_sync_batchnorm_and_a_changed_global_batch_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.sync_batchnorm.*CUDA"):
        Trainer(device="cpu", sync_batchnorm=True)
    trainer = Trainer(device="cpu", batch_size=64)
    state = {"global_batch_size": 128, "world_size": 2}
    with pytest.raises(ConfigError, match=r"trainer\.batch_size.*128, the global batch"):
        check_global_batch(state, trainer.batch_size)


def test_shards_of_an_augmented_batch_are_the_one_process_batch() -> None:
    view = ImageView(mean=[0.5], std=[0.25], channels=1, crop_padding=2, flip=True)
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    whole = view(images, torch.Generator().manual_seed(3))
    parts = [view(images[rows], torch.Generator().manual_seed(3), (rows, 10))
             for rows in (slice(0, 3), slice(3, 10))]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize(("preset", "epochs", "augment", "layer"),
                         [("papyan2020_imagenet", 350, False, "block"),
                          ("zhu2021_imagenet_resnet50", 200, True, "block")])
def test_imagenet_presets_compose_to_their_setups(preset: str, epochs: int, augment: bool,
                                                  layer: str) -> None:
    plain = validate(compose_cfg([f"experiment={preset}"]))
    assert plain["dataset"]["format"] == "image_folder" and plain["dataset"]["num_classes"] == 1000
    assert plain["arch"]["variant"] == "resnet50" and plain["feature_dim"] == 2048
    assert plain["arch"]["feature_layer"] == layer and plain["dataset"]["augment"] is augment
    assert plain["optim"]["_target_"] == "torch.optim.SGD"
    assert (plain["optim"]["lr"], plain["optim"]["momentum"]) == (0.05, 0.9)
    assert plain["optim"]["weight_decay"] == 5e-4 and plain["trainer"]["batch_size"] == 128
    assert plain["trainer"]["epochs"] == epochs
    etf = validate(compose_cfg([f"experiment={preset}", "head=etf", "dim=K"]))
    assert etf["feature_dim"] == 1000 and etf["head"]["embedding"] == "coordinate"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs: NCCL ranks and SyncBatchNorm take CUDA tensors "
                           "(this machine has none or one)")
def test_two_gpu_ranks_with_nccl_and_sync_batchnorm(runs: dict[str, RunFolder],
                                                    tmp_path: Path) -> None:
    gpu = ["trainer.device=cuda", "hydra.launcher.gpus_per_node=2"]
    plain = one_run_sweep([*MLP, *LOCAL_RANKS, *gpu], tmp_path / "plain")
    assert_same_run(runs["mlp/1"], plain, rtol=1e-4)  # TF32/cuBLAS against the CPU run
    synced = one_run_sweep([*MLP, "arch.batch_norm=true", "trainer.sync_batchnorm=true",
                    *LOCAL_RANKS, *gpu], tmp_path / "synced")
    summary = synced.read_summary()
    assert summary["world_size"] == 2 and summary["sync_batchnorm"] is True
    assert summary["device"].startswith("cuda")
