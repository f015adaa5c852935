"""The report's collapse-through-depth part: per-block NC1, the decay ratio and R² with their
intervals over seeds, the sentence on where candidate and baseline differ, and no part at all
(and no crash) where no run logged block metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ncsweep.nc import layers
from ncsweep.report import load_runs
from ncsweep.report.__main__ import main
from ncsweep.report.depth import FIT_KEYS, PREFIX, block_order, depth_runs, depth_table
from ncsweep.report.stats import mean_interval
from tests.test_report import BASE_FINALS, hand_sweep

BLOCKS = ("hidden1", "hidden2", "features")


def finals(nc1: tuple[float, ...]) -> dict:
    """Final metrics with block NC1 values and their exact data-separation fit."""
    fit = layers.data_separation_fit(range(len(nc1)), nc1)
    return {**BASE_FINALS, **fit,
            **{layers.layer_key(b, "nc1"): v for b, v in zip(BLOCKS, nc1, strict=True)}}


def test_the_report_keys_are_the_metrics_keys() -> None:
    assert (PREFIX, FIT_KEYS) == (layers.PREFIX, layers.FIT_KEYS)


def test_blocks_sort_in_forward_order() -> None:
    names = ["features", "stage4", "stem", "stage1", "fc2", "block10", "block2", "fc1"]
    assert sorted(names, key=block_order) == ["stem", "stage1", "block2", "stage4", "block10",
                                              "fc1", "fc2", "features"]


def test_the_depth_section_shows_nc1_per_block_the_fit_and_where_the_sides_differ(
        tmp_path: Path) -> None:
    base, etf = finals((1.0, 0.1, 0.01)), finals((1.0, 0.5, 0.25))
    sweep = hand_sweep(tmp_path / "sweep", etf, base)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "#### Collapse through depth: dataset=digits / arch=mlp / loss=ce" in md
    assert "![dataset=digits / arch=mlp / loss=ce: NC1 per block](depth-digits-mlp-ce.png)" in md
    assert (tmp_path / "out" / "depth-digits-mlp-ce.png").read_bytes()[:4] == b"\x89PNG"
    assert "| setting | runs | decay ratio | R² | NC1 hidden1 | NC1 hidden2 | NC1 features |" in md
    assert "| etf, d=K | 2 | 0.5 [0.5, 0.5] | 1 [1, 1] | 1 [1, 1] | 0.5 [0.5, 0.5] |" in md
    assert "| learned, d=512 | 2 | 0.1 [0.1, 0.1] | 1 [1, 1] |" in md
    assert ("differ by more than their 90% intervals in: decay ratio (higher for the "
            "candidate), NC1 at hidden2 (higher for the candidate), NC1 at features (higher "
            "for the candidate).") in md
    csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert set(csv["layers_decay_ratio"].round(6)) == {0.1, 0.5}


def test_intervals_over_seeds_are_t_intervals() -> None:
    rows = [{"dataset": "digits", "arch": "mlp", "loss": "ce", "head": "learned",
             "feature_dim": 512, "num_classes": 10, "seed": s, "status": "done",
             "path": f"p{s}", **finals((1.0, r, r * r))} for s, r in enumerate((0.2, 0.3, 0.5))]
    runs = pd.DataFrame(rows)
    group = {"dataset": "digits", "arch": "mlp", "loss": "ce", "condition": "none"}
    frame, blocks = depth_runs(runs, group, ("dataset", "arch", "loss"))
    assert blocks == list(BLOCKS) and len(frame) == 3
    table = depth_table(frame, blocks).set_index("setting")
    ratios = np.array([r["layers_decay_ratio"] for r in rows])
    half = stats.t.ppf(0.95, 2) * ratios.std(ddof=1) / math.sqrt(3)
    mean, low, high, n = mean_interval(ratios)
    assert (mean, low, high, n) == pytest.approx((ratios.mean(), ratios.mean() - half,
                                                  ratios.mean() + half, 3))
    assert table.loc["learned, d=512", "decay ratio"] == f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def test_runs_without_block_metrics_get_no_depth_part_and_no_crash(tmp_path: Path) -> None:
    sweep = hand_sweep(tmp_path / "sweep", BASE_FINALS)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Collapse through depth" not in md
    assert not list((tmp_path / "out").glob("depth-*.png"))
    frame, blocks = depth_runs(load_runs(sweep), {"dataset": "digits", "arch": "mlp",
                                                  "loss": "ce", "condition": "none"},
                               ("dataset", "arch", "loss"))
    assert frame.empty and blocks == []


def test_one_side_with_block_metrics_says_there_is_no_comparison(tmp_path: Path) -> None:
    sweep = hand_sweep(tmp_path / "sweep", finals((1.0, 0.5, 0.25)))
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No comparison: the candidate (etf, d=K) and the baseline" in md
