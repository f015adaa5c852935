"""Batched UFM starts: each start is its own single-start run, d = K reaches f*, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ncsweep.errors import ConfigError
from ncsweep.landscape import (
    BatchedGD,
    BatchedLBFGS,
    Chunked,
    UFMBatch,
    distinct_values,
    hessian_min_eigs,
    hessians,
)
from ncsweep.report import load, ufm_table, write_report
from ncsweep.theory import ufm_hessian_min_eig, ufm_objective
from tests.support import FAST

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
LANDSCAPE = [*FAST, "experiment=ufm_landscape", "dataset.n_per_class=2"]


def problem(k: int, d: int, n: int, loss: str, bias: bool = True, lambda_b: float = 0.0
            ) -> UFMBatch:
    return UFMBatch(torch.arange(k).repeat_interleave(n), k, d, loss, 5e-3, 5e-3, lambda_b, bias)


def random_points(p: UFMBatch, starts: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(starts, p.size, generator=torch.Generator().manual_seed(seed),
                       dtype=F64) / math.sqrt(p.feature_dim)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradient_match_the_objective_and_autograd(loss: str, bias: bool) -> None:
    p = problem(4, 3, 2, loss, bias, lambda_b=1e-2 if bias else 0.0)
    x = random_points(p, 3)
    value, grad = p.value_and_grad(x)
    for r in range(3):
        row = x[r].clone().requires_grad_(True)
        weight, features, b = p.split(row[None])
        f = ufm_objective(weight[0], features[0], None if b is None else b[0], p.labels, loss,
                          p.lambda_w, p.lambda_h, p.lambda_b)
        f.backward()
        assert value[r].item() == pytest.approx(f.item(), rel=1e-13)
        assert torch.allclose(grad[r], row.grad, rtol=1e-12, atol=1e-14)


def solver(kind: str, p: UFMBatch, x: torch.Tensor):
    if kind == "lbfgs":
        return BatchedLBFGS(p, x, lr=1.0, max_iter=7, history_size=4, tolerance_grad=1e-12,
                            tolerance_change=1e-16)
    return BatchedGD(p, x, lr=0.5, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("kind", ["lbfgs", "gd"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_each_batched_start_follows_its_single_start_run(kind: str, loss: str) -> None:
    p = problem(4, 2, 2, loss)
    x = random_points(p, 24)
    steps = 4 if kind == "lbfgs" else 30
    batched = Chunked([solver(kind, p, x[:10]), solver(kind, p, x[10:])])
    for _ in range(steps):
        batched.step()
    for r in range(x.shape[0]):
        alone = solver(kind, p, x[r:r + 1])
        for _ in range(steps):
            alone.step()
        assert batched.value[r].item() == pytest.approx(alone.value[0].item(), rel=1e-9)
        assert torch.allclose(batched.x[r], alone.x[0], rtol=1e-7, atol=1e-9)
        assert int(batched.iterations[r]) == int(alone.iterations[0])
    assert distinct_values(batched.value) > 1  # not all at one point: the check means something


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_hessians_equal_autograd(loss: str, bias: bool) -> None:
    p = UFMBatch(torch.tensor([0, 1, 2, 3, 4, 0, 2]), 5, 3, loss, 5e-3, 7e-3,
                 2e-3 if bias else 0.0, bias)
    x = random_points(p, 4, seed=1)

    def objective(row: torch.Tensor) -> torch.Tensor:
        weight, features, b = p.split(row[None])
        return ufm_objective(weight[0], features[0], None if b is None else b[0], p.labels,
                             loss, p.lambda_w, p.lambda_h, p.lambda_b)

    expected = torch.func.vmap(torch.func.hessian(objective))(x)
    assert torch.allclose(hessians(p, x), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("k,d,n,seed", [(4, 3, 2, 3),  # 22 parameters: a dense probe
                                         (10, 10, 1, 5)])  # 210: the probe runs Lanczos
def test_hessian_min_eigs_agree_with_the_theory_probe(k: int, d: int, n: int, seed: int) -> None:
    p = problem(k, d, n, "ce")
    x = random_points(p, 3, seed=seed)
    batched = hessian_min_eigs(p, x)
    for r in range(3):
        weight, features, b = p.split(x[r:r + 1])
        alone = ufm_hessian_min_eig(weight[0], features[0], b[0], p.labels, "ce",
                                    p.lambda_w, p.lambda_h, p.lambda_b)
        assert batched[r].item() == pytest.approx(alone, abs=1e-7)


def test_distinct_values_merge_within_the_relative_tolerance() -> None:
    values = torch.tensor([1.0, 1.0 + 5e-10, 2.0, 2.0 * (1 + 2e-9), math.nan], dtype=F64)
    assert distinct_values(values) == 4
    assert distinct_values(torch.tensor([3.0] * 5, dtype=F64)) == 1


def read_starts(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "starts.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_every_start_of_a_1000_start_cell_at_d_equal_k_reaches_f_star(job_runner,
                                                                      loss: str) -> None:
    folder, summary = job_runner([*LANDSCAPE, "dataset.num_classes=3", "dim=K", f"loss={loss}",
                                  "arch.starts=1000"])
    assert summary["starts"] == 1000 and summary["optimum_reference"] == "closed_form"
    assert summary["frac_reached_optimum"] == 1.0 and summary["n_reached_optimum"] == 1000
    assert summary["objective_gap_max"] < 1e-6 and summary["reached_global_optimum"]
    assert summary["n_above_tolerance"] == 0 and not summary["spurious_minimum_suspect"]
    assert summary["hessian_probed"] == 1 and summary["hessian_min_eig"] > -1e-6
    rows = read_starts(folder)
    assert [r["start"] for r in rows] == list(range(1000))
    assert all(r["outcome"] == "reached" and r["gap"] < 1e-6 for r in rows)
    assert max(r["gap"] for r in rows) == pytest.approx(summary["objective_gap_max"], abs=1e-15)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["frac_reached_optimum"] < 1.0 and metrics[-1]["starts"] == 1000


def test_a_start_is_the_single_start_run_from_the_same_init(job_runner) -> None:
    cell = [*LANDSCAPE, "dataset.num_classes=4", "dim=2", "loss=ce", "trainer.epochs=2",
            "optim.max_iter=6", "trainer.eval_every=1"]
    one_folder, one = job_runner([*cell, "arch.starts=1"], folder="one")
    many_folder, many = job_runner([*cell, "arch.starts=12"], folder="many")
    few_folder, _ = job_runner([*cell, "arch.starts=5"], folder="few")
    assert many["objective"] == pytest.approx(one["objective"], rel=1e-9)
    assert many["nc1"] == pytest.approx(one["nc1"], rel=1e-6)
    many_rows, few_rows = read_starts(many_folder), read_starts(few_folder)
    assert read_starts(one_folder)[0]["objective"] == pytest.approx(many_rows[0]["objective"],
                                                                    rel=1e-9)
    for a, b in zip(few_rows, many_rows[:5], strict=True):
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-9)
        assert a["iterations"] == b["iterations"]
    assert len({round(r["objective"], 6) for r in many_rows}) > 1


def test_below_k_minus_1_every_start_above_the_best_is_certified(job_runner) -> None:
    folder, summary = job_runner([*LANDSCAPE, "dataset.num_classes=8", "dim=2", "loss=ce",
                                  "arch.starts=150"])
    assert summary["optimum_reference"] == "best_found" and "frac_reached_optimum" not in summary
    rows = read_starts(folder)
    above = [r for r in rows if r["gap"] > 1e-6]
    assert len(above) == summary["n_above_tolerance"] > 0
    assert all(r["hessian_min_eig"] is not None for r in above)
    assert summary["hessian_probed"] == len(above) + (rows[0]["gap"] <= 1e-6)
    counts = {k: sum(r["outcome"] == k for r in rows)
              for k in ("reached", "saddle", "stationary_above", "not_converged")}
    assert counts["reached"] == summary["n_reached_best"]
    assert (counts["saddle"], counts["stationary_above"], counts["not_converged"]) == (
        summary["n_certified_saddles"], summary["n_stationary_above"],
        summary["n_not_converged"])
    for r in above:  # a saddle is a critical point: a vanishing gradient, negative curvature
        critical = r["grad_norm"] < 1e-6
        assert (r["outcome"] == "saddle") == (critical and r["hessian_min_eig"] < -1e-8)
        assert (r["outcome"] == "not_converged") == (not critical)
    assert summary["distinct_objective_values"] >= 2


@pytest.mark.parametrize(("override", "key"), [("arch.starts=0", "arch.starts"),
                                               ("optim=adam", "optim"),
                                               ("head=etf", "arch.starts")])
def test_bad_batched_settings_fail_in_one_line(job_runner, tmp_path: Path, override: str,
                                               key: str) -> None:
    with pytest.raises(SystemExit):
        job_runner([*FAST, "experiment=ufm", "dataset.num_classes=3", "dataset.n_per_class=2",
                    "arch.starts=4", override], folder="bad")
    line = (tmp_path / "bad" / "FAILED").read_text().splitlines()[0]
    assert f"{key}=" in line and "is not allowed" in line


def test_config_error_names_the_starts_key() -> None:
    from ncsweep.models import UFMFeatures

    with pytest.raises(ConfigError, match=r"arch.starts=0 is not allowed"):
        UFMFeatures((), 3, 3, 2, starts=0)


def write_ufm_folder(path: Path, k: int, d: int, loss: str, seed: int, summary: dict) -> None:
    """A UFM run folder written with plain json: run.json, config, metrics, summary, DONE."""
    path.mkdir(parents=True)
    identity = {"format": "ncsweep-run-1", "name": "hand", "run_key": path.name,
                "dataset": "ufm", "arch": "ufm", "head": "learned", "loss": loss,
                "optim": "lbfgs_exact", "schedule": "none", "launcher": "basic",
                "experiment": "ufm_landscape", "overrides": path.name.split(","),
                "dim": str(d), "feature_dim": d, "num_classes": k, "seed": seed,
                "embedding": None, "code_commit": None, "code_dirty": None, "created": 1.7e9}
    (path / "run.json").write_text(json.dumps(identity))
    (path / "config.json").write_text(json.dumps({"seed": seed, "feature_dim": d}))
    row = {"epoch": 8, "step": 8, "train_acc": 1.0, "train_loss": 0.1, "objective": 0.5,
           "grad_norm": 1e-9}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (path / "summary.json").write_text(json.dumps({**identity, "status": "done", **row,
                                                   **summary}))
    (path / "DONE").write_text("")


def test_report_shows_the_share_of_starts_at_the_optimum_per_cell(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    batched = {"starts": 1000, "n_reached_best": 1000, "distinct_objective_values": 1,
               "grad_norm_max": 2e-8, "hessian_min_eig": -1e-12, "n_certified_saddles": 0}
    write_ufm_folder(root / "k10-dK-ce", 10, 10, "ce", 0, {
        **batched, "objective_gap": 1e-15, "objective_gap_median": 1e-15,
        "objective_gap_max": 4e-15, "n_reached_optimum": 1000, "n_spurious_suspect": 0,
        "reached_global_optimum": True, "spurious_minimum_suspect": False})
    write_ufm_folder(root / "k10-dK-mse", 10, 10, "mse", 0, {
        **batched, "objective_gap": 1e-12, "objective_gap_median": 1e-12,
        "objective_gap_max": 3e-6, "n_reached_optimum": 997, "n_spurious_suspect": 0,
        "n_certified_saddles": 3, "reached_global_optimum": False,
        "spurious_minimum_suspect": False})
    write_ufm_folder(root / "k10-d2-ce", 10, 2, "ce", 0, {
        **batched, "n_reached_best": 685, "distinct_objective_values": 13,
        "n_certified_saddles": 13, "spurious_minimum_suspect": False})
    for seed, reached in ((0, True), (1, False)):
        write_ufm_folder(root / f"k4-dK-ce-{seed}", 4, 4, "ce", seed, {
            "objective_gap": 1e-14 if reached else 1e-3, "hessian_min_eig": -1e-3,
            "reached_global_optimum": reached, "spurious_minimum_suspect": False})
    runs, history = load(root)
    table = ufm_table(runs).set_index(["num_classes", "feature_dim", "loss"])
    assert table.loc[(10, 10, "ce"), ["n", "n_optimum", "optimum_share"]].tolist() == [
        1000, 1000, 1.0]
    assert table.loc[(10, 10, "mse"), "optimum_share"] == pytest.approx(0.997)
    assert table.loc[(10, 10, "mse"), "gap_max"] == pytest.approx(3e-6)
    below = table.loc[(10, 2, "ce")]
    assert math.isnan(below["optimum_share"]) and below["best_share"] == pytest.approx(0.685)
    assert below["distinct_values_max"] == 13 and below["d_over_k"] == pytest.approx(0.2)
    old = table.loc[(4, 4, "ce")]
    assert (old["runs"], old["n"], old["n_optimum"], old["optimum_share"]) == (2, 2, 1, 0.5)
    assert table["n_saddles"].sum() == 16
    write_report(runs, history, tmp_path / "out", sources=[str(root)])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "random starts that reached the global optimum: 1998/2002 (99.8%)" in md
    assert "at d = K: 1998/2002" in md
    assert "without a closed form (d < K-1): 685/1000 starts (68.5%)" in md
    assert "up to 13 distinct final values" in md and "no spurious local minimum found: yes" in md
    assert "| 10 | 2 | ce | 0.2 | 1 | 1000 | - | 685 (68.5%) | 13 |" in md
    assert "| 10 | 10 | mse | 1 | 1 | 1000 | 997 (99.7%) | 1000 (100%) |" in md
    assert (tmp_path / "out" / "ufm.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
