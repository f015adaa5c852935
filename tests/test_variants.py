"""Variants on every data set (digits, synthetic, the UFM), and the noisy/imbalanced metrics.

References are written here with numpy loops over the samples, never with ncsweep's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ncsweep import data as D
from ncsweep.build import build_run
from ncsweep.config import ConfigError, validate
from ncsweep.nc import KEYS
from ncsweep.training import evaluate
from tests.support import FAST, compose_cfg, run_cli

K = 10
SMALL = [*FAST, "trainer.device=cpu", "arch.width=64", "trainer.batch_size=128"]


def load(overrides: list[str]) -> D.DataBundle:
    """The configured builder, called outside Hydra's instantiate (which wraps its errors)."""
    cfg = compose_cfg(overrides)
    validate(cfg)
    return instantiate(cfg.dataset, _partial_=True)()


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train labels, test labels) of the digits split, drawn here as the config says."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, _, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return y_tr, y_te


def trained(overrides: list[str], epochs: int = 30):
    """A model trained for real by the configured trainer, its data and its last eval row."""
    cfg = compose_cfg([*SMALL, f"trainer.epochs={epochs}", f"trainer.eval_every={epochs}",
                       *overrides])
    plain = validate(cfg)
    run = build_run(plain)
    result = run.trainer.fit(run.model, run.loss, run.optimizer, run.scheduler, run.data,
                             seed=plain["seed"])
    run.model.eval()
    return run, result.final


@torch.no_grad()
def predictions(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features, argmax of the logits) of every sample, in one forward pass of the split."""
    features, logits = model.features_and_logits(x)
    return features.double().numpy(), logits.argmax(dim=1).numpy()


def nc1_and_nc4(h: np.ndarray, y: np.ndarray, logits_pred: np.ndarray) -> tuple[float, float]:
    """nc1 = tr(Sigma_W Sigma_B^+)/K and nc4 (argmax vs nearest class mean), by the book."""
    k = int(y.max()) + 1
    means = np.array([h[y == c].mean(axis=0) for c in range(k)])
    mu_g = h.mean(axis=0)
    centred = h - means[y]
    sigma_w = centred.T @ centred / len(y)
    sigma_b = sum(np.outer(means[c] - mu_g, means[c] - mu_g) for c in range(k)) / k
    cut = max(h.shape[1], k) * np.finfo(np.float64).eps
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=cut, hermitian=True)) / k)
    nearest = np.array([np.argmin([np.sum((h[i] - means[c]) ** 2) for c in range(k)])
                        for i in range(len(y))])
    return nc1, float(np.mean(nearest != logits_pred))


# -------------------------------------------------------------------------- variants on digits

def test_exp_imbalance_on_digits_trains_the_formulas_counts() -> None:
    y_tr, y_te = digits_split()
    n_avail = int(np.bincount(y_tr).min())
    n_min = math.floor(n_avail / 10)
    n_max = round(n_min * 10)
    expected = [round(n_max * 10 ** (-k / (K - 1))) for k in range(K)]
    assert expected[0] == n_max and expected[-1] == n_min and n_max <= n_avail
    bundle = load(["dataset.imbalance=exp", "dataset.imbalance_ratio=10"])
    counts = np.bincount(bundle.train.labels.numpy(), minlength=K).tolist()
    assert counts == expected == bundle.info["train_class_counts"]
    assert bundle.info["train_class_counts_clean"] == expected
    assert bundle.info["imbalance_ratio_actual"] == n_max / n_min == 10.0
    assert bundle.info["imbalance"] == "exp" and bundle.info["imbalance_ratio"] == 10.0
    assert bundle.minority_classes == bundle.info["minority_classes"] == [5, 6, 7, 8, 9]
    assert bundle.test.labels.tolist() == y_te.tolist()  # the test split is untouched
    again = load(["dataset.imbalance=exp", "dataset.imbalance_ratio=10"])
    reseeded = load(["dataset.imbalance=exp", "dataset.imbalance_ratio=10", "dataset.seed=1"])
    assert torch.equal(bundle.train.inputs, again.train.inputs)
    assert not torch.equal(bundle.train.inputs, reseeded.train.inputs)


def test_step_imbalance_minorities_are_the_configured_share() -> None:
    bundle = load(["dataset.imbalance=step", "dataset.imbalance_ratio=5",
                   "dataset.imbalance_minority_fraction=0.3", "dataset.samples_per_class=50"])
    assert bundle.info["train_class_counts"] == [50] * 7 + [10] * 3
    assert bundle.minority_classes == [7, 8, 9]
    assert bundle.info["imbalance_minority_fraction"] == 0.3


def test_symmetric_noise_on_digits_is_binomially_right_and_keeps_test_clean() -> None:
    y_tr, y_te = digits_split()
    bundle = load(["dataset.label_noise=symmetric", "dataset.label_noise_rate=0.3"])
    clean, noisy = bundle.train.clean_labels.numpy(), bundle.train.labels.numpy()
    assert sorted(clean.tolist()) == sorted(y_tr.tolist())
    n = len(noisy)
    flipped = sum(int(a != b) for a, b in zip(noisy, clean, strict=True))
    assert abs(flipped / n - 0.3) <= 3 * math.sqrt(0.3 * 0.7 / n)
    assert bundle.info["label_noise_actual"] == flipped / n
    assert bundle.info["train_class_counts_clean"] == np.bincount(y_tr).tolist()
    assert bundle.info["train_class_counts"] == np.bincount(noisy, minlength=K).tolist()
    assert bundle.test.clean_labels is None and bundle.test.labels.tolist() == y_te.tolist()
    assert len({int(b) for a, b in zip(noisy, clean, strict=True) if a != b}) == K


def test_tabular_subsets_subsamples_and_random_labels() -> None:
    subset = load(["dataset.classes=[7,2,5]", "dataset.num_classes=3"])
    _, y_te = digits_split()
    assert subset.test.labels.tolist() == [[7, 2, 5].index(c) for c in y_te if c in (7, 2, 5)]
    few = load(["dataset.samples_per_class=9", "dataset.random_labels=true"])
    assert few.info["train_class_counts_clean"] == [9] * K and len(few.train) == 9 * K
    assert few.info["random_labels"] and 0.6 < few.info["label_noise_actual"] < 1.0
    mixture = load(["dataset=synthetic", "dataset.mixture_classes=6", "dataset.classes=[4,0]",
                    "dataset.num_classes=2", "dataset.label_noise=pair",
                    "dataset.label_noise_rate=0.5"])
    assert mixture.info["train_class_counts_clean"] == [100, 100]
    assert mixture.info["label_noise_actual"] == 0.5
    flipped = mixture.train.labels != mixture.train.clean_labels
    assert torch.equal(mixture.train.labels[flipped], 1 - mixture.train.clean_labels[flipped])
    with pytest.raises(ConfigError, match=r"^dataset\.mixture_classes=None is not allowed"):
        load(["dataset=synthetic", "dataset.classes=[4,0]", "dataset.num_classes=2"])


# ---------------------------------------------------------------------- one-line refusals

REFUSALS = [
    (["dataset.label_noise_rate=0.3"], "dataset.label_noise_rate"),
    (["dataset.label_noise=symmetric"], "dataset.label_noise_rate"),
    (["dataset.label_noise=pair", "dataset.label_noise_rate=0.001"],
     "dataset.label_noise_rate"),
    (["dataset.imbalance=exp", "dataset.imbalance_ratio=1e9"], "dataset.imbalance_ratio"),
    (["dataset.imbalance_ratio=10"], "dataset.imbalance_ratio"),
    (["dataset.imbalance=exp", "dataset.imbalance_minority_fraction=0.3"],
     "dataset.imbalance_minority_fraction"),
    (["dataset.imbalance=step", "dataset.imbalance_minority_fraction=0.01"],
     "dataset.imbalance_minority_fraction"),
    (["dataset=synthetic", "dataset.classes=[0,3]", "dataset.num_classes=2"],
     "dataset.mixture_classes"),
    (["experiment=ufm", "dataset.num_classes=4", "dataset.n_per_class=[6,6,2]"],
     "dataset.n_per_class"),
]


def _assert_one_line_refusal(stderr: str, key: str, root: Path) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"ncsweep: error: {key}=") and " is not allowed: " in lines[0]
    assert not list(root.rglob("metrics.jsonl")) and not list(root.rglob("DONE"))


def test_a_refusal_through_the_cli_is_one_line_and_trains_nothing(tmp_path: Path) -> None:
    overrides, key = REFUSALS[0]
    result = run_cli([*FAST, "trainer.device=cpu", *overrides], tmp_path, timeout=120)
    assert result.returncode != 0
    _assert_one_line_refusal(result.stderr, key, tmp_path)


@pytest.mark.parametrize("overrides,key", REFUSALS)
def test_an_option_that_cannot_take_effect_is_refused_in_one_line(job_runner, capsys,
                                                                  tmp_path: Path,
                                                                  overrides: list[str],
                                                                  key: str) -> None:
    with pytest.raises(SystemExit) as exited:
        job_runner([*FAST, "trainer.device=cpu", *overrides], folder="refused")
    assert exited.value.code != 0
    _assert_one_line_refusal(capsys.readouterr().err, key, tmp_path)


# ---------------------------------------------------------------- metrics under label noise

@pytest.fixture(scope="module")
def noisy_run():
    return trained(["dataset.label_noise=symmetric", "dataset.label_noise_rate=0.3"])


def test_clean_accuracy_and_memorization_equal_counts_by_hand(noisy_run) -> None:
    run, row = noisy_run
    train = run.data.train
    _, pred = predictions(run.model, train.inputs)
    noisy, clean = train.labels.numpy(), train.clean_labels.numpy()
    n = len(pred)
    hits_clean = sum(int(p == c) for p, c in zip(pred, clean, strict=True))
    flipped = [i for i in range(n) if noisy[i] != clean[i]]
    memorised = sum(int(pred[i] == noisy[i]) for i in flipped)
    assert row["train_acc_clean"] == hits_clean / n
    assert row["memorization"] == memorised / len(flipped)
    assert row["train_acc"] == sum(int(p == y) for p, y in zip(pred, noisy, strict=True)) / n
    assert 0 < row["memorization"] < 1 and row["train_acc_clean"] != row["train_acc"]


def test_clean_nc_metrics_follow_the_clean_labels(noisy_run) -> None:
    run, row = noisy_run
    train = run.data.train
    h, pred = predictions(run.model, train.inputs)
    for key in KEYS:
        assert f"{key}_clean" in row
    nc1_clean, nc4_clean = nc1_and_nc4(h, train.clean_labels.numpy(), pred)
    nc1_noisy, nc4_noisy = nc1_and_nc4(h, train.labels.numpy(), pred)
    assert row["nc1_clean"] == pytest.approx(nc1_clean, rel=1e-6)
    assert row["nc1"] == pytest.approx(nc1_noisy, rel=1e-6)
    assert row["nc4_clean"] == pytest.approx(nc4_clean, abs=1e-12)
    assert row["nc4"] == pytest.approx(nc4_noisy, abs=1e-12)
    assert abs(row["nc1_clean"] - row["nc1"]) > 1e-3
    assert "nc4_test_clean" in row and 0 <= row["nc4_test_clean"] <= 1


def test_a_second_pass_gives_the_same_clean_metrics(noisy_run) -> None:
    run, row = noisy_run
    kept = evaluate(run.model, run.loss, run.data, 4096, 512 * 2**20)
    streamed = evaluate(run.model, run.loss, run.data, 100, 1)  # nothing kept: second pass
    for key in ("nc4", "nc4_clean", "nc4_rowspace_clean", "train_acc_clean", "memorization"):
        assert streamed[key] == pytest.approx(kept[key], abs=1e-12) and kept[key] == row[key]
    assert streamed["nc1_clean"] == pytest.approx(kept["nc1_clean"], rel=1e-9)


def test_a_clean_run_logs_no_noise_keys_and_rate_zero_logs_them() -> None:
    plain = load([])
    assert plain.train.clean_labels is None and plain.minority_classes is None
    zero = load(["dataset.label_noise=pair", "dataset.label_noise_rate=0"])
    assert zero.info["label_noise_actual"] == 0.0 and zero.train.clean_labels is not None
    cfg = compose_cfg([*SMALL, "dataset.label_noise=pair", "dataset.label_noise_rate=0"])
    run = build_run(validate(cfg))
    row = evaluate(run.model, run.loss, run.data, 4096, 512 * 2**20)
    assert row["nc1_clean"] == row["nc1"] and row["train_acc_clean"] == row["train_acc"]
    assert "memorization" not in row  # no label was flipped
    clean_cfg = compose_cfg(SMALL)
    clean_run = build_run(validate(clean_cfg))
    clean_row = evaluate(clean_run.model, clean_run.loss, clean_run.data, 4096, 512 * 2**20)
    assert not [k for k in clean_row if k.endswith("_clean") or "minority" in k
                or k.startswith("test_acc_class_") or k == "memorization"]


# ------------------------------------------------------------------ metrics under imbalance

def test_minority_collapse_and_per_class_test_accuracy_by_hand() -> None:
    run, row = trained(["dataset.imbalance=step", "dataset.imbalance_ratio=20"], epochs=20)
    assert run.data.minority_classes == [5, 6, 7, 8, 9]
    w = run.model.head.weight.detach().double().numpy()
    minority = run.data.minority_classes
    cosines = [w[a] @ w[b] / (np.linalg.norm(w[a]) * np.linalg.norm(w[b]))
               for i, a in enumerate(minority) for b in minority[i + 1:]]
    assert row["minority_collapse"] == pytest.approx(np.mean(cosines), rel=1e-9)
    _, pred = predictions(run.model, run.data.test.inputs)
    y = run.data.test.labels.numpy()
    for k in range(K):
        mine = [i for i in range(len(y)) if y[i] == k]
        assert row[f"test_acc_class_{k}"] == sum(int(pred[i] == k) for i in mine) / len(mine)
    minor = [i for i in range(len(y)) if y[i] in minority]
    major = [i for i in range(len(y)) if y[i] not in minority]
    assert row["test_acc_minority"] == sum(int(pred[i] == y[i]) for i in minor) / len(minor)
    assert row["test_acc_majority"] == sum(int(pred[i] == y[i]) for i in major) / len(major)


# ---------------------------------------------------------------------- the UFM's class counts

def test_ufm_takes_per_class_counts_and_omits_the_gap_it_cannot_know(job_runner) -> None:
    base = [*FAST, "experiment=ufm", "dataset.num_classes=4", "trainer.epochs=3",
            "trainer.eval_every=3", "trainer.device=cpu"]
    _, skewed = job_runner([*base, "dataset.n_per_class=[6,6,2,2]"])
    assert skewed["status"] == "done" and skewed["train_class_counts"] == [6, 6, 2, 2]
    assert skewed["minority_classes"] == [2, 3] and skewed["imbalance_ratio_actual"] == 3.0
    assert "objective_gap" not in skewed and "objective_star" not in skewed
    assert "reached_global_optimum" not in skewed and -1 <= skewed["minority_collapse"] <= 1
    assert skewed["n_per_class"] is None and "objective" in skewed
    _, equal = job_runner([*base, "dataset.n_per_class=[5,5,5,5]"])
    _, scalar = job_runner([*base, "dataset.n_per_class=5"])
    assert equal["objective_gap"] == scalar["objective_gap"] >= 0
    assert equal["n_per_class"] == scalar["n_per_class"] == 5
    assert "minority_collapse" not in scalar
    bundle = D.make_ufm(num_classes=3, n_per_class=[4, 1, 2])
    assert bundle.train.labels.tolist() == [0, 0, 0, 0, 1, 2, 2]
