"""Tests of ncsweep.nc against the formulas of docs/nc-metrics.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncsweep.nc import KEYS, NCAccumulator, nc_metrics

COLLAPSE_KEYS = [k for k in KEYS if k not in ("w_norm_mean", "m_norm_mean")]
SCALE_FREE_KEYS = [k for k in KEYS if k not in ("nc4_bias", "w_norm_mean", "m_norm_mean")]


def simplex_etf_means(k: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """K unit-norm simplex-ETF vectors in R^d (d >= K-1), rotated by random orthonormal columns."""
    centred = np.sqrt(k / (k - 1)) * (np.eye(k) - 1.0 / k)
    if d == k - 1:
        basis = np.linalg.qr(np.c_[np.ones(k), rng.standard_normal((k, k - 1))])[0][:, 1:]
        return centred @ basis
    columns = np.linalg.qr(rng.standard_normal((d, k)))[0]
    return centred @ columns.T


def reference_metrics(h, y, w, b, k: int) -> dict[str, float]:
    """Two-pass float64 NC metrics with explicit loops, straight from the formulas."""
    h, w, b = (np.asarray(a, dtype=np.float64) for a in (h, w, b))
    n = h.shape[0]
    mu = np.stack([h[y == c].mean(axis=0) for c in range(k)])
    mu_g = h.mean(axis=0)
    m = mu - mu_g
    centred = h - mu[y]
    sigma_w = centred.T @ centred / n
    sigma_b = sum(np.outer(m[c], m[c]) for c in range(k)) / k
    etf = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)

    def etf_distance(g):
        return np.linalg.norm(g / np.linalg.norm(g) - etf)

    def norms(x):
        return np.array([np.linalg.norm(row) for row in x])

    def cosines(x):
        return np.array(
            [
                x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
                for i in range(k)
                for j in range(k)
                if i != j
            ]
        )

    logits = h @ w.T + b
    distances = np.array([[np.linalg.norm(x - mu[c]) for c in range(k)] for x in h])
    variances = [np.mean([np.sum((x - mu[c]) ** 2) for x in h[y == c]]) for c in range(k)]
    cdnv = [
        (variances[i] + variances[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    out = {
        "nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / k,
        "nc2_w": etf_distance(w @ w.T),
        "nc2_m": etf_distance(m @ m.T),
        "nc2_equinorm_w": norms(w).std(ddof=1) / norms(w).mean(),
        "nc2_equinorm_m": norms(m).std(ddof=1) / norms(m).mean(),
        "nc2_equiangle_w": cosines(w).std(ddof=1),
        "nc2_equiangle_m": cosines(m).std(ddof=1),
        "nc2_maxangle_w": np.mean(np.abs(cosines(w) + 1 / (k - 1))),
        "nc2_maxangle_m": np.mean(np.abs(cosines(m) + 1 / (k - 1))),
        "nc3": etf_distance(w @ m.T),
        "nc3_duality": np.linalg.norm(w / np.linalg.norm(w) - m / np.linalg.norm(m)) ** 2,
        "nc4": np.mean(logits.argmax(axis=1) != distances.argmin(axis=1)),
        "nc4_bias": np.linalg.norm(w @ mu_g + b),
        "cdnv": np.mean(cdnv),
        "trace_ratio": np.trace(sigma_w) / np.trace(sigma_b),
        "w_norm_mean": norms(w).mean(),
        "m_norm_mean": norms(m).mean(),
    }
    return {key: float(value) for key, value in out.items()}


def assert_close(got: dict, want: dict, keys, rtol: float, atol: float = 1e-12) -> None:
    for key in keys:
        assert math.isfinite(got[key]), key
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key


def random_problem(n=300, d=7, k=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    centres = rng.standard_normal((k, d)) * 2
    h = centres[y] + rng.standard_normal((n, d))
    return h, y, rng.standard_normal((k, d)), rng.standard_normal(k)


@pytest.mark.parametrize("k", [2, 4, 10])
@pytest.mark.parametrize("extra_dims", [-1, 0, 5])
def test_simplex_etf_configuration_is_fully_collapsed(k, extra_dims):
    rng = np.random.default_rng(k)
    d = k + extra_dims
    means = 3.0 * simplex_etf_means(k, d, rng)
    y = np.repeat(np.arange(k), 4)
    out = nc_metrics(torch.from_numpy(means[y]), torch.from_numpy(y), torch.from_numpy(2.5 * means))
    assert set(out) == set(KEYS)
    for key in COLLAPSE_KEYS:
        assert abs(out[key]) < 1e-10, (key, out[key])
    assert out["nc4"] == 0.0
    assert out["m_norm_mean"] == pytest.approx(3.0)
    assert out["w_norm_mean"] == pytest.approx(7.5)


def test_orthogonal_frame_classifier_nc2_w_by_hand():
    k = 4
    rng = np.random.default_rng(1)
    means = simplex_etf_means(k, k, rng)
    y = np.repeat(np.arange(k), 3)
    out = nc_metrics(means[y], y, np.eye(k))
    # ||I/sqrt(K) - E||^2 = 1 + 1 - 2 tr(E)/sqrt(K), tr(E) = (K-1)/sqrt(K-1) = sqrt(K-1)
    closed_form = math.sqrt(2.0 - 2.0 * math.sqrt((k - 1) / k))
    assert closed_form == pytest.approx(math.sqrt(2.0 - math.sqrt(3.0)))
    assert out["nc2_w"] == pytest.approx(0.5176380902050415, rel=1e-12)
    assert out["nc2_w"] == pytest.approx(closed_form, rel=1e-12)
    assert out["nc2_equinorm_w"] == 0.0
    assert out["nc2_equiangle_w"] == 0.0
    assert out["nc2_maxangle_w"] == pytest.approx(1.0 / 3.0, rel=1e-12)


def test_random_features_match_two_pass_reference():
    h, y, w, b = random_problem()
    want = reference_metrics(h, y, w, b, 5)
    assert_close(nc_metrics(h, y, w, b), want, KEYS, rtol=1e-8)
    assert_close(nc_metrics(h, y, w), reference_metrics(h, y, w, np.zeros(5), 5), KEYS, 1e-8)


@pytest.mark.parametrize("d", [300, 530])
def test_wide_features_match_reference(d):
    h, y, w, b = random_problem(n=400, d=d, k=6, seed=d)
    assert_close(nc_metrics(h, y, w, b), reference_metrics(h, y, w, b, 6), KEYS, rtol=1e-8)


def batches(n: int, rng: np.random.Generator, sizes=(1, 7, 40, 95)) -> list[np.ndarray]:
    """Shuffled indices cut into batches of varying sizes, in random order."""
    order = rng.permutation(n)
    cuts, start = [], 0
    while start < n:
        size = int(rng.choice(sizes))
        cuts.append(order[start : start + size])
        start += size
    rng.shuffle(cuts)
    return cuts


def test_streaming_equals_one_shot_with_kept_features():
    h, y, w, b = random_problem()
    want = nc_metrics(h, y, w, b)
    acc = NCAccumulator(5)
    for idx in batches(len(y), np.random.default_rng(3)):
        acc.update(torch.from_numpy(h[idx]), torch.from_numpy(y[idx]))
    assert acc.memory_bytes()["kept_features"] > 0
    assert_close(acc.compute(w, b), want, KEYS, rtol=1e-10)


def test_streaming_past_budget_needs_and_uses_second_pass():
    h, y, w, b = random_problem()
    want = nc_metrics(h, y, w, b)
    acc = NCAccumulator(5, max_feature_bytes=1000)
    rng = np.random.default_rng(4)
    for idx in batches(len(y), rng):
        acc.update(h[idx], y[idx])
    assert acc.memory_bytes() == {"state": (5 + 5 * 7 + 5 + 7 * 7) * 8, "kept_features": 0}
    with pytest.raises(ValueError, match="update_predictions"):
        acc.compute(w, b)
    for idx in batches(len(y), rng):
        acc.update_predictions(h[idx], y[idx], w, b)
    assert_close(acc.compute(w, b), want, KEYS, rtol=1e-10)
    with pytest.raises(ValueError, match="different weight or bias"):
        acc.compute(w + 1.0, b)
    with pytest.raises(ValueError, match="finish pass 1"):
        acc.update(h, y)


def test_second_pass_over_other_data_is_refused():
    h, y, w, b = random_problem()
    acc = NCAccumulator(5, max_feature_bytes=0)
    acc.update(h, y)
    acc.update_predictions(h[:100], y[:100], w, b)
    with pytest.raises(ValueError, match="exactly the data of the first"):
        acc.compute(w, b)
    with pytest.raises(ValueError, match="different weight or bias"):
        acc.update_predictions(h, y, 2 * w, b)


def test_nearly_collapsed_float32_streaming_nc1_is_accurate():
    rng = np.random.default_rng(5)
    n, d, k = 20_000, 64, 10
    y = rng.integers(0, k, n)
    centres = rng.standard_normal((k, d))
    centres *= 10.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    h32 = (centres[y] + 1e-5 * rng.standard_normal((n, d))).astype(np.float32)
    h = h32.astype(np.float64)
    mu = np.stack([h[y == c].mean(axis=0) for c in range(k)])
    centred = h - mu[y]
    sigma_w = centred.T @ centred / n
    m = mu - h.mean(axis=0)
    sigma_b = m.T @ m / k
    want = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / k

    acc = NCAccumulator(k)
    for idx in np.array_split(rng.permutation(n), [1000, 4000, 4100, 9000, 15000]):
        acc.update(torch.from_numpy(h32[idx]), torch.from_numpy(y[idx]))
    got = acc.compute(rng.standard_normal((k, d)))["nc1"]
    assert got == pytest.approx(want, rel=1e-6)

    t32 = torch.from_numpy(h32)
    counts = torch.bincount(torch.from_numpy(y), minlength=k).float()
    mu32 = torch.from_numpy(mu).float()
    naive = t32.T @ t32 / n - (mu32.T * counts / n) @ mu32
    naive_error = torch.linalg.matrix_norm(naive.double() - torch.from_numpy(sigma_w))
    assert naive_error > 100 * np.linalg.norm(sigma_w)


def test_permuting_samples_changes_nothing():
    h, y, w, b = random_problem(seed=6)
    perm = np.random.default_rng(6).permutation(len(y))
    assert_close(nc_metrics(h[perm], y[perm], w, b), nc_metrics(h, y, w, b), KEYS, rtol=1e-12)


def test_scaling_features_and_weights_keeps_scale_free_keys():
    h, y, w, b = random_problem(seed=7)
    want = nc_metrics(h, y, w, b)
    got = nc_metrics(3.7 * h, y, 0.2 * w, 3.7 * 0.2 * b)
    assert_close(got, want, SCALE_FREE_KEYS, rtol=1e-10)
    assert got["w_norm_mean"] == pytest.approx(0.2 * want["w_norm_mean"])
    assert got["m_norm_mean"] == pytest.approx(3.7 * want["m_norm_mean"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, y, w: (h, np.where(y == 3, 0, y), w), "class 3 has no samples in the data"),
        (lambda h, y, w: (h, np.where(y == 3, 5, y), w), r"labels must lie in \[0, 5\)"),
        (lambda h, y, w: (h, np.where(y == 3, -1, y), w), r"got values in \[-1, 4\]"),
        (lambda h, y, w: (h, y, w[:, :6]), r"\(5, 7\), got \(5, 6\)"),
        (lambda h, y, w: (h, y[:-1], w), r"labels must have shape \(300,\)"),
        (lambda h, y, w: (h[0], y, w), "features must be 2-D"),
        (lambda h, y, w: (h, y.astype(float), w), "labels must be integers"),
        (lambda h, y, w: (np.where(h > 2, np.nan, h), y, w), "NaN or inf"),
        (lambda h, y, w: (h, y, 0 * w), "row 0 of W is zero"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, message):
    h, y, w, _ = random_problem()
    with pytest.raises(ValueError, match=message):
        nc_metrics(*change(h, y, w))


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes, got num_classes=1"):
        nc_metrics(np.ones((4, 3)), np.zeros(4, dtype=int), np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        NCAccumulator(1)


def test_missing_class_message_names_num_classes():
    h, y, w, _ = random_problem()
    with pytest.raises(ValueError, match="every class of num_classes=6 present"):
        nc_metrics(h, y, np.vstack([w, w[:1]]), num_classes=6)


@pytest.mark.parametrize("k", [2, 3])
def test_one_dimensional_features_give_finite_values(k):
    h, y, w, b = random_problem(n=60, d=1, k=k, seed=k)
    out = nc_metrics(h, y, w, b)
    assert all(math.isfinite(v) for v in out.values())
    assert_close(out, reference_metrics(h, y, w, b, k), KEYS, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float64_of_same_numbers(dtype):
    h, y, w, b = (torch.from_numpy(a) for a in random_problem(seed=8))
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    got = nc_metrics(h, y, w, b)
    want = nc_metrics(h.double(), y, w.double(), b.double())
    assert_close(got, want, KEYS, rtol=1e-12)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: checks nc_metrics on device tensors matches the CPU result",
)
@pytest.mark.gpu
def test_cuda_tensors_match_cpu():
    h, y, w, b = (torch.from_numpy(a) for a in random_problem(seed=9))
    want = nc_metrics(h.float(), y, w, b)
    got = nc_metrics(h.float().cuda(), y.cuda(), w.cuda(), b.cuda())
    assert_close(got, want, KEYS, rtol=1e-9)
    acc = NCAccumulator(5, max_feature_bytes=0)
    acc.update(h[:150].float().cuda(), y[:150].cuda())
    acc.update(h[150:].float().cuda(), y[150:].cuda())
    acc.update_predictions(h.float().cuda(), y.cuda(), w.cuda(), b.cuda())
    assert_close(acc.compute(w.cuda(), b.cuda()), want, KEYS, rtol=1e-9)


def test_needs_second_pass_says_when_nc4_needs_update_predictions() -> None:
    rng = np.random.default_rng(5)
    h, y = rng.standard_normal((60, 4)), np.repeat(np.arange(3), 20)
    w = rng.standard_normal((3, 4))
    kept = NCAccumulator(3)
    kept.update(h, y)
    assert not kept.needs_second_pass
    dropped = NCAccumulator(3, max_feature_bytes=0)
    dropped.update(h, y)
    assert dropped.needs_second_pass
    dropped.update_predictions(h, y, w)
    assert not dropped.needs_second_pass
    assert dropped.compute(w) == pytest.approx(kept.compute(w), rel=1e-12)
