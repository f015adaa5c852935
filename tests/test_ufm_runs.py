"""UFM runs end to end: random starts reach the closed-form optimum; the landscape preset; two
local ranks equal one process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import (
    FAST,
    LOCAL_RANKS,
    assert_rank_zero_wrote_alone,
    assert_same_run,
    compose_cfg,
    one_run_sweep,
    run_cli,
)

UFM = [*FAST, "experiment=ufm", "dataset.num_classes=4", "dataset.n_per_class=5",
       "trainer.epochs=20", "trainer.eval_every=10"]


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ufm_from_random_starts_reaches_the_global_optimum(job_runner, loss: str,
                                                           seed: int) -> None:
    _, summary = job_runner([*UFM, f"loss={loss}", f"seed={seed}"])
    assert summary["feature_dim"] == 4
    assert 0 <= summary["objective_gap"] < 1e-6
    assert summary["grad_norm"] < 1e-6
    assert summary["reached_global_optimum"] and not summary["spurious_minimum_suspect"]
    assert summary["hessian_min_eig"] > -1e-6
    assert summary["nc1"] < 1e-8 and summary["nc2_w"] < 1e-4 and summary["nc3"] < 1e-4
    # the Hessian certificate is part of the run's wall time, and its own time is recorded
    assert summary["final_checks_time_s"] > 0
    assert summary["wall_time_s"] >= summary["train_time_s"] + summary["final_checks_time_s"]


def test_mse_without_bias_ends_in_an_orthogonal_frame(job_runner) -> None:
    _, summary = job_runner([*UFM, "loss=mse", "head.bias=false"])
    assert 0 <= summary["objective_gap"] < 1e-6
    k = 4
    frame_distance = (2 - 2 * ((k - 1) / k) ** 0.5) ** 0.5  # ||I/sqrt(K) - E||_F
    assert summary["nc2_w"] == pytest.approx(frame_distance, rel=1e-4)


def test_a_run_stopped_early_has_a_positive_gap_and_no_false_alarm(job_runner) -> None:
    _, summary = job_runner([*UFM, "trainer.epochs=1", "optim.max_iter=3", "loss=ce"])
    assert summary["objective_gap"] > 1e-6 and not summary["reached_global_optimum"]
    assert not summary["spurious_minimum_suspect"]


def test_ufm_with_a_frozen_etf_head_skips_the_gap(job_runner) -> None:
    _, summary = job_runner([*UFM, "head=etf", "trainer.epochs=2"])
    assert "objective_gap" not in summary and summary["objective"] > 0


def test_landscape_preset_spans_the_grid() -> None:
    cfg = compose_cfg(["experiment=ufm_landscape"])
    params = cfg.hydra.sweeper.params
    assert params["dim"] == "2,K-1,K"
    assert params["dataset.num_classes"] == "4,10,100" and params["loss"] == "ce,mse"
    assert cfg.arch.starts >= 1000 and cfg.optim.weight_decay == 0


def test_landscape_sweep_runs_a_slice_from_the_cli(tmp_path) -> None:
    result = run_cli(["-m", "experiment=ufm_landscape", "logger=none", "trainer.progress=false",
                      "dataset.num_classes=4", "dim=K-1,K", "loss=ce", "seed=0",
                      "arch.lambda_w=1e-3", "arch.lambda_h=1e-3", "trainer.epochs=4",
                      "arch.starts=20"],
                     tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 done" in result.stdout
    done = sorted((tmp_path / "multirun" / "ufm_landscape").glob("*/DONE"))
    assert len(done) == 2
    for marker in done:
        assert len((marker.parent / "starts.jsonl").read_text().splitlines()) == 20


UFM_RANKS = ["logger=none", "trainer.progress=false", "seed=0", "experiment=ufm",
             "dataset.num_classes=4", "dataset.n_per_class=5", "trainer.epochs=3",
             "trainer.eval_every=3", "optim.max_iter=4", "name=ddp"]


def test_two_local_ranks_of_a_ufm_run_equal_one_process(tmp_path: Path) -> None:
    """Real gloo ranks through submitit's local launcher, beside the one-process run."""
    cases = {"1": UFM_RANKS, "2": [*UFM_RANKS, *LOCAL_RANKS]}
    with ThreadPoolExecutor(2) as pool:
        reference, ranks = pool.map(lambda c: one_run_sweep(cases[c], tmp_path / c), cases)
    assert_same_run(reference, ranks, rtol=1e-6)
    assert not [k for k in ranks.read_metrics()[-1] if k.startswith("layers")]
    assert_rank_zero_wrote_alone(ranks, reference)
