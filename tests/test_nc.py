"""Tests of ncsweep.nc against the formulas of docs/metrics.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncsweep.heads import simplex_etf
from ncsweep.nc import (
    COMPUTE_KEYS,
    HELDOUT_KEYS,
    KEYS,
    ROWSPACE_KEYS,
    HeldOutNC4,
    NCAccumulator,
    decisions,
    nc_metrics,
)
from ncsweep.nc.pairs import cdnv, symmetric_pairs
from tests.support import block_reference

COLLAPSE_KEYS = [k for k in COMPUTE_KEYS if k not in ("w_norm_mean", "m_norm_mean", "nc2_of")]
SCALE_FREE_KEYS = [
    k for k in COMPUTE_KEYS if k not in ("nc4_bias", "w_norm_mean", "m_norm_mean")
]


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
        "nc2_of": np.linalg.norm(mu @ mu.T / np.linalg.norm(mu @ mu.T) - np.eye(k) / np.sqrt(k)),
    }
    return {key: float(value) for key, value in out.items()}


def rowspace_projector(w) -> np.ndarray:
    """P_W = W^+ W in float64, by torch's pseudo-inverse."""
    w64 = torch.as_tensor(np.asarray(w, dtype=np.float64))
    return (torch.linalg.pinv(w64) @ w64).numpy()


def full_reference(h, y, w, b, k: int) -> dict[str, float]:
    """reference_metrics, plus each row-space key as its metric on the features h P_W."""
    out = reference_metrics(h, y, w, b, k)
    projected = reference_metrics(np.asarray(h, dtype=np.float64) @ rowspace_projector(w), y, w,
                                  b, k)
    return out | {f"{key}_rowspace": projected[key] for key in ("nc1", "nc2_m", "nc3_duality",
                                                              "nc4")}


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
    assert set(out) == set(COMPUTE_KEYS)
    assert set(ROWSPACE_KEYS) < set(COMPUTE_KEYS) and set(KEYS) < set(COMPUTE_KEYS)
    assert not set(HELDOUT_KEYS) & set(COMPUTE_KEYS)
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
    want = full_reference(h, y, w, b, 5)
    assert_close(nc_metrics(h, y, w, b), want, COMPUTE_KEYS, rtol=1e-8)
    assert_close(nc_metrics(h, y, w), full_reference(h, y, w, np.zeros(5), 5), COMPUTE_KEYS, 1e-8)


@pytest.mark.parametrize("d", [300, 530])
def test_wide_features_match_reference(d):
    h, y, w, b = random_problem(n=400, d=d, k=6, seed=d)
    assert_close(nc_metrics(h, y, w, b), full_reference(h, y, w, b, 6), COMPUTE_KEYS, rtol=1e-8)


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
    assert_close(acc.compute(w, b), want, COMPUTE_KEYS, rtol=1e-10)


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
    assert_close(acc.compute(w, b), want, COMPUTE_KEYS, rtol=1e-10)
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
    with pytest.raises(ValueError, match="NaN or inf"):
        acc.update_predictions(np.where(h > 2, np.nan, h), y, w, b)


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
    got, want = nc_metrics(h[perm], y[perm], w, b), nc_metrics(h, y, w, b)
    assert_close(got, want, COMPUTE_KEYS, rtol=1e-12)


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
    assert_close(out, full_reference(h, y, w, b, k), COMPUTE_KEYS, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float64_of_same_numbers(dtype):
    h, y, w, b = (torch.from_numpy(a) for a in random_problem(seed=8))
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    got = nc_metrics(h, y, w, b)
    want = nc_metrics(h.double(), y, w.double(), b.double())
    assert_close(got, want, COMPUTE_KEYS, rtol=1e-12)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: checks nc_metrics on device tensors matches the CPU result",
)
@pytest.mark.gpu
def test_cuda_tensors_match_cpu():
    h, y, w, b = (torch.from_numpy(a) for a in random_problem(seed=9))
    want = nc_metrics(h.float(), y, w, b)
    got = nc_metrics(h.float().cuda(), y.cuda(), w.cuda(), b.cuda())
    assert_close(got, want, COMPUTE_KEYS, rtol=1e-9)
    acc = NCAccumulator(5, max_feature_bytes=0)
    acc.update(h[:150].float().cuda(), y[:150].cuda())
    acc.update(h[150:].float().cuda(), y[150:].cuda())
    acc.update_predictions(h.float().cuda(), y.cuda(), w.cuda(), b.cuda())
    assert_close(acc.compute(w.cuda(), b.cuda()), want, COMPUTE_KEYS, rtol=1e-9)
    test_nc4 = HeldOutNC4(acc, w.cuda(), b.cuda())
    test_nc4.update(2.0 * h.float().cuda())
    cpu_acc = NCAccumulator(5)
    cpu_acc.update(h.float(), y)
    cpu_nc4 = HeldOutNC4(cpu_acc, w, b)
    cpu_nc4.update(2.0 * h.float())
    assert test_nc4.compute() == cpu_nc4.compute()


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


def rank_deficient_problem(n=400, d=20, k=5, rank=4, seed=10):
    """W = A B of the given rank; class means and much larger spread in W's null space too."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    w = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, d))
    basis = np.linalg.svd(w)[2]
    row, null = basis[:rank].T, basis[rank:].T
    h = (5.0 * rng.standard_normal((k, rank))[y] + 0.3 * rng.standard_normal((n, rank))) @ row.T
    h += (2.0 * rng.standard_normal((k, d - rank))[y] + 10.0 * rng.standard_normal(
        (n, d - rank))) @ null.T
    return h, y, w, rng.standard_normal(k)


def test_rowspace_keys_equal_full_keys_when_w_has_full_column_rank():
    h, y, _, b = random_problem(d=6, k=6, seed=11)
    learned = torch.nn.Linear(6, 6, dtype=torch.float64)
    for w in (learned.weight.detach().numpy(), np.random.default_rng(11).standard_normal((6, 6))):
        out = nc_metrics(h, y, w, b)
        assert np.linalg.matrix_rank(rowspace_projector(w)) == 6
        for key in ("nc1", "nc2_m", "nc3_duality", "nc4"):
            assert out[f"{key}_rowspace"] == out[key], key
        assert_close(out, full_reference(h, y, w, b, 6), ROWSPACE_KEYS, rtol=1e-10)


def test_rowspace_keys_match_explicitly_projected_reference_for_rank_deficient_w():
    h, y, w, b = rank_deficient_problem()
    projector = rowspace_projector(w)
    assert np.linalg.matrix_rank(projector) == 4
    assert np.abs(projector @ projector - projector).max() < 1e-12
    projected = reference_metrics(h @ projector, y, w, b, 5)
    out = nc_metrics(h, y, w, b)
    for key in ("nc1", "nc2_m", "nc3_duality", "nc4"):
        assert out[f"{key}_rowspace"] == pytest.approx(projected[key], rel=1e-8, abs=1e-12), key
    assert out["nc1"] > 10.0 * out["nc1_rowspace"] > 0.0
    assert out["nc4"] != out["nc4_rowspace"]


def test_ill_conditioned_w_scores_rowspace_centres_directly():
    h, y, w, b = rank_deficient_problem(seed=17)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    s[3] = 1e-6 * s[0]
    w = (u * s) @ vh
    assert s[0] / s[3] > 1e4
    projected = reference_metrics(h @ rowspace_projector(w), y, w, b, 5)
    out = nc_metrics(h, y, w, b)
    for key in ("nc1", "nc2_m", "nc3_duality", "nc4"):
        assert out[f"{key}_rowspace"] == pytest.approx(projected[key], rel=1e-8, abs=1e-12), key


def test_float32_decisions_agree_with_all_samples_rechecked_in_float64(monkeypatch):
    monkeypatch.setattr(decisions, "FLOAT32_MIN_CLASSES", 0)
    h, y, w, b = rank_deficient_problem(seed=18)
    certified = nc_metrics(h, y, w, b)
    monkeypatch.setattr(decisions, "SAFETY", math.inf)
    rechecked = nc_metrics(h, y, w, b)
    assert 0.0 < certified["nc4_rowspace"] == rechecked["nc4_rowspace"] != rechecked["nc4"]
    assert certified["nc4"] == rechecked["nc4"]


def test_rowspace_keys_stream_the_same_with_kept_features_and_second_pass():
    h, y, w, b = rank_deficient_problem(seed=12)
    want = nc_metrics(h, y, w, b)
    rng = np.random.default_rng(12)
    kept, dropped = NCAccumulator(5), NCAccumulator(5, max_feature_bytes=1000)
    for idx in batches(len(y), rng):
        kept.update(h[idx].astype(np.float32).astype(np.float64), y[idx])
        dropped.update(torch.from_numpy(h[idx]), torch.from_numpy(y[idx]))
    assert dropped.needs_second_pass and not kept.needs_second_pass
    for idx in batches(len(y), rng):
        dropped.update_predictions(h[idx], y[idx], w, b)
    assert_close(dropped.compute(w, b), want, COMPUTE_KEYS, rtol=1e-10)
    got = kept.compute(w, b)
    assert_close(got, want, ("nc4", "nc4_rowspace"), rtol=0.0, atol=2 / len(y))
    assert_close(got, want, ROWSPACE_KEYS[:3], rtol=1e-5)


def test_float32_etf_head_at_d_equal_k_has_rank_k_minus_one():
    k = 5
    w32 = simplex_etf(k, k, "random").numpy()
    frame = simplex_etf(k, k, "random", dtype=torch.float64).numpy()
    singular = np.linalg.svd(w32.astype(np.float64), compute_uv=False)
    assert 1e-6 * singular[0] > singular[-1] > 1e-10 * singular[0]
    null = np.linalg.svd(frame)[2][-1]
    rng = np.random.default_rng(13)
    y = np.repeat(np.arange(k), 30)
    h = 3.0 * frame[y] + 5.0 * rng.standard_normal(len(y))[:, None] * null
    out = nc_metrics(h, y, w32)
    assert out["nc1"] > 0.1 and out["nc4"] > 0.0
    assert out["nc1_rowspace"] < 1e-10
    assert out["nc2_m_rowspace"] < 1e-7 and out["nc3_duality_rowspace"] < 1e-7
    assert out["nc4_rowspace"] == 0.0
    as_float64 = nc_metrics(h, y, w32.astype(np.float64))
    assert as_float64["nc1_rowspace"] == as_float64["nc1"]


def test_class_means_only_in_null_space_of_w_are_refused():
    y = np.repeat(np.arange(3), 4)
    h = np.zeros((12, 4))
    h[:, 3] = y + 0.1 * np.arange(12)
    h[:, 0] = np.arange(12) % 2
    w = np.eye(4)[:3] + np.array([[0.0], [1.0], [2.0]]) * np.eye(4)[1]
    assert np.abs(w @ (h[y == 1].mean(axis=0) - h[y == 0].mean(axis=0))).max() == 0.0
    with pytest.raises(ValueError, match=r"W M\^T is zero"):
        nc_metrics(h, y, w)


def test_nc2_of_is_zero_for_one_hot_means_with_zero_mean_noise():
    k, d = 6, 10
    rng = np.random.default_rng(14)
    y = np.repeat(np.arange(k), 50)
    noise = 0.1 * rng.standard_normal((len(y), d))
    for c in range(k):
        noise[y == c] -= noise[y == c].mean(axis=0)
    h = np.eye(k, d)[y] + noise
    w = rng.standard_normal((k, d))
    out = nc_metrics(h, y, w)
    assert out["nc2_of"] < 1e-12
    assert out["nc1"] > 1e-3
    shifted = nc_metrics(h + np.ones(d), y, w)
    assert shifted["nc2_m"] == pytest.approx(out["nc2_m"], abs=1e-12)
    assert shifted["nc2_of"] > 0.1


@pytest.mark.parametrize("k", [3, 4, 10])
def test_nc2_of_of_simplex_etf_at_d_equal_k_minus_one(k):
    means = 2.0 * simplex_etf_means(k, k - 1, np.random.default_rng(k))
    y = np.repeat(np.arange(k), 3)
    out = nc_metrics(means[y], y, means)
    # G ∝ I - 11^T/K: <G/||G||, I/sqrt(K)> = (K-1)/sqrt((K-1) K), so ||.||^2 = 2 - 2 sqrt((K-1)/K)
    closed_form = math.sqrt(2.0 - 2.0 * math.sqrt((k - 1) / k))
    assert out["nc2_of"] == pytest.approx(closed_form, rel=1e-12)
    assert out["nc2_m"] < 1e-12
    assert (out["nc2_of"] > 0.5) == (k <= 4)


def heldout_reference(h_train, y_train, h_test, w, b, k: int) -> float:
    """Fraction of test samples whose argmax logit is not the nearest train class mean, by loops."""
    mu = np.stack([h_train[y_train == c].mean(axis=0) for c in range(k)])
    nearest = [np.argmin([np.linalg.norm(x - mu[c]) for c in range(k)]) for x in h_test]
    predicted = [np.argmax(w @ x + b) for x in h_test]
    return float(np.mean(np.array(nearest) != np.array(predicted)))


def test_nc4_test_matches_direct_reference_streamed_over_batches():
    h, y, w, b = random_problem(n=500, d=8, k=4, seed=15)
    rng = np.random.default_rng(15)
    h_test = 1.5 * rng.standard_normal((237, 8)) + h.mean(axis=0)
    want = heldout_reference(h, y, h_test, w, b, 4)
    assert 0.05 < want < 0.95
    train = NCAccumulator(4, max_feature_bytes=0)
    for idx in batches(len(y), rng):
        train.update(h[idx], y[idx])
    test_nc4 = HeldOutNC4(train, w, b)
    for idx in np.array_split(np.arange(len(h_test)), [1, 50, 51, 200]):
        test_nc4.update(torch.from_numpy(h_test[idx]))
    assert test_nc4.compute() == pytest.approx(want, abs=1e-15)
    one_shot = HeldOutNC4(train, torch.from_numpy(w).float(), torch.from_numpy(b).float())
    one_shot.update(h_test.astype(np.float32))
    want32 = heldout_reference(h, y, h_test.astype(np.float32).astype(np.float64),
                               w.astype(np.float32), b.astype(np.float32), 4)
    assert one_shot.compute() == pytest.approx(want32, abs=1e-15)
    train_nc4 = HeldOutNC4(train, w, b)
    train_nc4.update(h)
    assert train_nc4.compute() == pytest.approx(nc_metrics(h, y, w, b)["nc4"], abs=1e-15)


def test_nearest_centre_accuracy_of_the_nc4_decisions_equals_a_direct_reference():
    h, y, w, b = random_problem(n=500, d=8, k=4, seed=17)
    rng = np.random.default_rng(17)
    h_test = 1.5 * rng.standard_normal((237, 8)) + h.mean(axis=0)
    y_test = rng.integers(0, 4, 237)
    want = block_reference(h, y, h_test, y_test, 4)
    assert 0.3 < want["ncc_acc_train"] < 1.0 and 0.1 < want["ncc_acc_test"] < 0.9
    kept, streamed = NCAccumulator(4), NCAccumulator(4, max_feature_bytes=0)
    for idx in batches(len(y), rng):
        kept.update(h[idx], y[idx])
        streamed.update(h[idx], y[idx])
    with pytest.raises(ValueError, match="known after compute"):
        kept.nearest_centre_accuracy()
    for idx in batches(len(y), rng):
        streamed.update_predictions(h[idx], y[idx], w, b)
    kept.compute(w, b)
    streamed.compute(w, b)
    assert kept.nearest_centre_accuracy() == want["ncc_acc_train"]
    assert streamed.nearest_centre_accuracy() == want["ncc_acc_train"]
    heldout, unlabelled = HeldOutNC4(kept, w, b), HeldOutNC4(kept, w, b)
    for idx in np.array_split(np.arange(len(h_test)), [1, 50, 51, 200]):
        heldout.update(torch.from_numpy(h_test[idx]), torch.from_numpy(y_test[idx]))
        unlabelled.update(torch.from_numpy(h_test[idx]))
    assert heldout.compute() == unlabelled.compute()
    assert heldout.nearest_centre_accuracy() == want["ncc_acc_test"]
    with pytest.raises(ValueError, match="needs labels with every update"):
        unlabelled.nearest_centre_accuracy()


def test_cdnv_from_exact_differences_equals_the_tiled_gram_path():
    rng = np.random.default_rng(18)
    m = torch.from_numpy(rng.standard_normal((9, 40)))
    m[3] = m[2] + 1e-9  # a near pair, recomputed directly on the Gram path
    variances = torch.from_numpy(rng.uniform(0.5, 2.0, 9))
    norms = torch.linalg.vector_norm(m, dim=1)
    tiled = symmetric_pairs(m, 4, "M M^T", norms=norms, variances=variances)["cdnv"]
    assert float(cdnv(m, variances, 4)) == pytest.approx(float(tiled), rel=1e-12)
    m[5] = m[1]
    with pytest.raises(ValueError, match="classes 1 and 5 have identical means"):
        cdnv(m, variances, 4)


def test_nc4_test_refuses_bad_input():
    h, y, w, b = random_problem(seed=16)
    train = NCAccumulator(5)
    with pytest.raises(ValueError, match="HeldOutNC4 needs data"):
        HeldOutNC4(train, w, b)
    train.update(h, y)
    test_nc4 = HeldOutNC4(train, w, b)
    with pytest.raises(ValueError, match="nc4_test needs data"):
        test_nc4.compute()
    with pytest.raises(ValueError, match="earlier batches had d=7"):
        test_nc4.update(h[:, :6])
    with pytest.raises(ValueError, match="NaN or inf"):
        test_nc4.update(np.where(h > 2, np.inf, h))
    with pytest.raises(ValueError, match=r"\(5, 7\), got \(5, 6\)"):
        HeldOutNC4(train, w[:, :6], b)
