"""Verdicts end to end on hand-written run folders: yes / no / inconclusive through the CLI, in
verdicts.csv and report.md; the answer at the end of a sweep; reports that never crash; the
landscape's distinct values counted beyond what the stopping rule explains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ncsweep.landscape import (
    BatchedLBFGS,
    UFMBatch,
    distinct_summary,
    distinct_values,
    stopping_tolerance,
    value_groups,
)
from ncsweep.report import sweep_answer
from ncsweep.report.__main__ import main
from ncsweep.report.stats import event_rate_bound, seeds_needed
from ncsweep.report.verdicts import ASSUMED_SD_PTS, read_verdicts
from tests.test_report import BASE_FINALS, PNG_MAGIC, hand_sweep, write_folder

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = range(5)
BASE_ACC = (0.90, 0.91, 0.92, 0.93, 0.94)
DIFFS_PTS = {"yes": (0.1, 0.0, 0.2, 0.1, 0.1), "no": (-2.0, -2.1, -1.9, -2.0, -2.0),
             "inconclusive": (-1.0, 0.8, -0.3, 0.9, -0.4)}
REPORT_FILES = {"runs.csv", "verdicts.csv", "report.md", "report.html", "forest.png"}


def case_sweep(root: Path, case: str, seeds=SEEDS, finals: dict = BASE_FINALS) -> Path:
    """learned/etf x d=K/512 over ``seeds``; ETF d=K's test accuracy = baseline + the case's
    differences; every run records ``case`` (its own condition)."""
    for head in ("learned", "etf"):
        for dim in (10, 512):
            for seed in seeds:
                acc = BASE_ACC[seed] + (DIFFS_PTS[case][seed] / 100 if (head, dim) == (
                    "etf", 10) else 0.0)
                write_folder(root / case / f"dim={dim},head={head},seed={seed}", head, dim,
                             seed, {**finals, "test_acc": acc}, embedding="coordinate",
                             recorded={"case": case})
    return root


def test_known_accuracies_give_yes_no_inconclusive_through_the_cli(tmp_path: Path) -> None:
    for case in DIFFS_PTS:
        case_sweep(tmp_path / "sweep", case)
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--margin", "0.5"]) == 0
    verdicts = read_verdicts(out / "verdicts.csv")
    accuracy = verdicts[verdicts["claim"] == "accuracy"].set_index("condition")
    for case in DIFFS_PTS:
        row = accuracy.loc[f"case={case}"]
        assert row["verdict"] == case, (case, row.to_dict())
        assert row["estimate"] == pytest.approx(sum(DIFFS_PTS[case]) / 5, abs=1e-9)
        assert row["method"] == "paired t" and row["n_baseline"] == row["n_candidate"] == 5
        assert row["ci_low"] < row["estimate"] < row["ci_high"]
    assert accuracy.loc["case=yes", "ci_low"] > -0.5 > accuracy.loc["case=no", "ci_high"]
    assert accuracy.loc["case=yes", "p_adjusted"] < 0.05
    assert accuracy.loc["case=inconclusive", "seeds_needed"].isdigit()
    tested = verdicts[verdicts["claim"].isin(["accuracy", "collapse"])]
    assert len(tested) == 3 * 4
    md = (out / "report.md").read_text()
    assert "12 tests Holm-adjusted together" in md
    for case in DIFFS_PTS:
        section = md.split(f"loss=ce: case={case}")[1].split("###")[0]
        line = next(x for x in section.splitlines() if "within 0.5 points" in x)
        assert f"(or above it): {case} (" in line
        assert f"{accuracy.loc[f'case={case}', 'estimate']:+.2f} pts" in line
    assert "docs/report.md" in md.split("\n\n")[1]
    assert {p.name for p in out.iterdir()} >= REPORT_FILES


def test_one_seed_is_inconclusive_and_says_how_many_seeds_settle_it(tmp_path: Path) -> None:
    sweep = case_sweep(tmp_path / "sweep", "yes", seeds=[0])
    lines = sweep_answer(sweep / "yes")
    needed, _ = seeds_needed(0.1, 0.5, (ASSUMED_SD_PTS, ASSUMED_SD_PTS))
    accuracy = [x for x in lines if ": accuracy " in x]
    assert len(accuracy) == 1 and "accuracy inconclusive" in accuracy[0]
    assert f"about {needed} seeds a side would settle it" in accuracy[0]
    assert lines[-1] == f"report written to {sweep / 'yes' / 'report' / 'report.md'}"
    verdicts = read_verdicts(sweep / "yes" / "report" / "verdicts.csv")
    row = verdicts.set_index("claim").loc["accuracy"]
    assert row["verdict"] == "inconclusive" and row["seeds_needed"] == str(needed)
    assert "1 seed: no spread" in row["reason"] and math.isnan(row["ci_low"])
    md = (sweep / "yes" / "report" / "report.md").read_text()
    assert "(or above it): inconclusive" in md and f"assumed sd of {ASSUMED_SD_PTS:g}" in md
    assert "std n/a" not in md and "n/a (1 seed)" not in md
    assert "(0 of 1 failed or diverged, but that only bounds" in md


def test_no_answer_without_a_baseline_candidate_pair(tmp_path: Path) -> None:
    write_folder(tmp_path / "sweep" / "dim=K,head=etf,seed=0", "etf", 10, 0, BASE_FINALS)
    assert sweep_answer(tmp_path / "sweep") == []
    assert sweep_answer(tmp_path / "nothing-here") == []
    assert not (tmp_path / "sweep" / "report").exists()


@pytest.mark.parametrize("finals", [
    {"nc1": 0.0, "nc2_m": 0.0, "nc3": 0.0, "nc4": 0.0},
    {},
], ids=["all-zero", "missing"])
def test_runs_whose_nc_values_are_zero_or_missing_write_every_file(tmp_path: Path,
                                                                   finals: dict) -> None:
    hand_sweep(tmp_path / "sweep", finals)
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert REPORT_FILES | {"curves-digits-mlp-ce.png", "resources-digits-mlp-ce.png"} <= names
    for name in names - {"runs.csv", "verdicts.csv", "report.md", "report.html"}:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    collapse = read_verdicts(out / "verdicts.csv")
    collapse = collapse[collapse["claim"] == "collapse"]
    expected = {"yes"} if finals else {"n/a"}
    assert set(collapse["verdict"]) == expected


def write_ufm(path: Path, k: int, d: int, loss: str, summary: dict) -> None:
    """A batched UFM run folder in the documented layout."""
    path.mkdir(parents=True)
    identity = {"format": "ncsweep-run-1", "name": "landscape", "run_key": path.name,
                "dataset": "ufm", "arch": "ufm", "head": "learned", "loss": loss,
                "optim": "lbfgs_landscape", "schedule": "none", "launcher": "basic",
                "experiment": "ufm_landscape", "overrides": [], "dim": str(d),
                "feature_dim": d, "num_classes": k, "seed": 0, "embedding": None}
    (path / "run.json").write_text(json.dumps(identity))
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 8, "step": 8, **summary}) + "\n")
    (path / "summary.json").write_text(json.dumps({**identity, "status": "done", **summary}))
    (path / "DONE").write_text("")


STARTS = {"starts": 1000, "n_reached_best": 1000, "distinct_objective_values": 1,
          "distinct_value_tol": 2.9e-6, "distinct_value_spread": 8.8e-10,
          "grad_norm_max": 7.5e-7, "hessian_min_eig": 1e-3, "n_spurious_suspect": 0,
          "n_certified_saddles": 0, "objective": 0.5, "nc1": 0.0, "nc2_m": 0.0}


@pytest.mark.parametrize("d,closed", [(2, False), (4, True)], ids=["d=2", "d=K"])
def test_a_single_landscape_cell_writes_every_file_and_its_bound(tmp_path: Path, d: int,
                                                                 closed: bool) -> None:
    extra = {"objective_gap": 1e-12, "objective_gap_max": 2e-12, "objective_gap_median": 1e-12,
             "n_reached_optimum": 1000} if closed else {}
    write_ufm(tmp_path / "sweep" / f"dim={d}", 4, d, "ce", {**STARTS, **extra})
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"runs.csv", "verdicts.csv", "report.md", "report.html", "ufm.png"} <= names
    assert (out / "ufm.png").read_bytes().startswith(PNG_MAGIC)
    md = (out / "report.md").read_text()
    assert (f"K=4, d={d}, ce: no spurious minimum in 1000 starts, so a random start lands in a "
            "spurious basin with probability at most 3/1000 = 0.3% (95%, rule of three); "
            "1 distinct final value(s) in one run") in md


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_k4_landscape_cell_where_every_start_reaches_one_optimum_has_one_value(
        loss: str, d: int) -> None:
    k, starts = 4, 200
    problem = UFMBatch(torch.arange(k), k, d, loss, 5e-3, 5e-3, 0.0, True)
    x = torch.randn(starts, problem.size, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) / math.sqrt(d)
    solver = BatchedLBFGS(problem, x, lr=1.0, max_iter=25, history_size=5,
                          tolerance_grad=1e-7, tolerance_change=1e-16)
    for _ in range(8):
        solver.step()
    value = solver.value
    assert bool((value - value.min() <= 1e-6).all())  # every start at one optimum
    summary = distinct_summary(value, solver.x, 1e-7)
    assert summary["distinct_objective_values"] == 1
    assert summary["distinct_value_spread"] == pytest.approx(
        (value.max() - value.min()).item(), rel=1e-12)
    assert summary["distinct_value_spread"] <= summary["distinct_value_tol"]
    assert summary["distinct_value_tol"] == stopping_tolerance(1e-7, solver.x)


def test_distinct_values_count_only_what_the_stopping_rule_cannot_explain() -> None:
    values = torch.tensor([1.0, 1.0 + 3e-9, 1.0 + 5e-9, 1.2, 1.2 + 1e-9, math.nan],
                          dtype=torch.float64)
    assert distinct_values(values) == 5  # 1e-9 relative: one minimum read as several
    assert distinct_values(values, rel_tol=0.0, abs_tol=1e-8) == 3
    groups = value_groups(values, rel_tol=0.0, abs_tol=1e-8)
    assert [g[2] for g in groups] == [3, 2]
    assert groups[0][1] == pytest.approx(5e-9) and groups[1][0] == pytest.approx(1.2)
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    assert stopping_tolerance(1e-7, x) == pytest.approx(math.sqrt(2) * 1e-7 * 5.0)


def test_stability_bound_is_the_exact_binomial_one() -> None:
    assert event_rate_bound(0, 5) == pytest.approx(1 - 0.05 ** (1 / 5))
    assert event_rate_bound(0, 4) > 0.5 > event_rate_bound(0, 5)
    assert event_rate_bound(3, 3) == 1.0
