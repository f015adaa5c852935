"""UFM closed forms checked against direct minimisation, and the Hessian probes against
finite differences, dense solves and the origin's closed form."""

from __future__ import annotations

import math

import pytest
import torch

from ncsweep.theory import (
    UFMOptimum,
    hessian_min_eig,
    ufm_hessian_min_eig,
    ufm_objective,
    ufm_optimum,
    ufm_origin_min_eig,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

SETTINGS = [
    pytest.param("ce", True, 1e-2, id="ce-bias-penalised"),
    pytest.param("ce", True, 0.0, id="ce-bias-free"),
    pytest.param("ce", False, 0.0, id="ce-no-bias"),
    pytest.param("mse", True, 0.0, id="mse-bias-free"),
    pytest.param("mse", False, 0.0, id="mse-no-bias"),
]

POINTS = [
    pytest.param(3, 2, 5e-3, 1e-2, id="K3n2"),
    pytest.param(4, 3, 1e-2, 1e-2, id="K4n3"),
    pytest.param(5, 4, 1e-2, 5e-3, id="K5n4"),
]


def _labels(k: int, n: int) -> torch.Tensor:
    return torch.arange(k).repeat_interleave(n)


def _flat_objective(k, d, n, loss, lambda_w, lambda_h, lambda_b, bias):
    """f as a function of one flat vector [W, H, b], and the sizes of its parts."""
    sizes = [k * d, k * n * d] + ([k] if bias else [])
    labels = _labels(k, n)

    def f(x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, sizes)
        b = parts[2] if bias else None
        w, h = parts[0].view(k, d), parts[1].view(k * n, d)
        return ufm_objective(w, h, b, labels, loss, lambda_w, lambda_h, lambda_b)

    return f, sizes


def _minimise(k, d, n, loss, lambda_w, lambda_h, lambda_b, bias, seed=0):
    """Global minimisation from a random start: L-BFGS (strong Wolfe), then Newton steps.

    Newton with a least-squares solve (rotation symmetry makes the Hessian singular) takes
    the gradient norm below 1e-10, where line searches stall on float64 resolution of f.
    """
    f, sizes = _flat_objective(k, d, n, loss, lambda_w, lambda_h, lambda_b, bias)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), generator=generator, dtype=F64).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], lr=1, max_iter=2000, tolerance_grad=1e-5, tolerance_change=0,
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = f(x)
        value.backward()
        return value

    opt.step(closure)
    x = x.detach()
    for _ in range(8):
        grad = torch.func.grad(f)(x)
        if grad.norm() < 1e-13:
            break
        hess = torch.func.hessian(f)(x)
        step = torch.linalg.lstsq(hess, grad.unsqueeze(1), rcond=1e-10, driver="gelsd")
        x = x - step.solution.squeeze(1)
    grad_norm = float(torch.func.grad(f)(x).norm())
    parts = torch.split(x, sizes)
    b = parts[2] if bias else None
    return parts[0].view(k, d), parts[1].view(k * n, d), b, float(f(x)), grad_norm


def _lambdas_at_ratio(k: int, n: int, ratio: float, lambda_h: float = 0.05):
    """(lambda_w, lambda_h) with K sqrt(n lambda_w lambda_h) equal to ``ratio``."""
    return (ratio / k) ** 2 / (n * lambda_h), lambda_h


def _assert_matches_minimiser(opt: UFMOptimum, k, d, n, loss, lw, lh, lb, bias):
    w, h, b, value, grad_norm = _minimise(k, d, n, loss, lw, lh, lb, bias)
    assert grad_norm < 1e-10
    assert value == pytest.approx(opt.objective, rel=1e-8, abs=1e-12)
    torch.testing.assert_close(w @ w.T, opt.weight @ opt.weight.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(h @ h.T, opt.features @ opt.features.T, rtol=0, atol=1e-7)
    if not bias:
        assert opt.bias is None
    elif loss == "ce" and lb == 0:
        assert float((b - b.mean()).norm()) < 1e-7
    else:
        assert float((b - opt.bias).norm()) < 1e-7
    return w, h


# ---------------------------------------------------------------- closed form vs minimisation


@pytest.mark.parametrize(("loss", "bias", "lb"), SETTINGS)
@pytest.mark.parametrize(("k", "n", "lw", "lh"), POINTS)
def test_closed_form_matches_direct_minimisation(k, n, lw, lh, loss, bias, lb):
    opt = ufm_optimum(k, k, n, loss, lw, lh, lb, bias)
    assert opt.regime == ("orthogonal_frame" if loss == "mse" and not bias else "etf")
    _assert_matches_minimiser(opt, k, k, n, loss, lw, lh, lb, bias)


@pytest.mark.parametrize(("loss", "bias", "lb"), [SETTINGS[0], SETTINGS[2], SETTINGS[3]])
@pytest.mark.parametrize("dim_offset", [-1, 2])
def test_etf_optimum_at_other_dims(loss, bias, lb, dim_offset):
    k, n, lw, lh = 4, 3, 1e-2, 5e-3
    d = k + dim_offset
    opt = ufm_optimum(k, d, n, loss, lw, lh, lb, bias)
    assert opt.weight.shape == (k, d) and opt.features.shape == (k * n, d)
    _assert_matches_minimiser(opt, k, d, n, loss, lw, lh, lb, bias)


@pytest.mark.parametrize(("loss", "bias", "lb"), SETTINGS)
@pytest.mark.parametrize("ratio", [0.97, 1.03, 1.5])
def test_threshold_matches_minimisation(loss, bias, lb, ratio):
    k, n = 4, 3
    lw, lh = _lambdas_at_ratio(k, n, ratio)
    opt = ufm_optimum(k, k, n, loss, lw, lh, lb, bias)
    assert (opt.regime == "zero") == (ratio > 1)
    assert (opt.a == 0) == (ratio > 1)
    w, h = _assert_matches_minimiser(opt, k, k, n, loss, lw, lh, lb, bias)
    if ratio > 1:
        assert float(w.norm()) < 1e-7 and float(h.norm()) < 1e-7


@pytest.mark.parametrize(("loss", "bias", "expected"), [
    ("ce", True, math.log(4)), ("ce", False, math.log(4)),
    ("mse", True, 3 / 8), ("mse", False, 0.5),
])
@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_zero_solution_at_and_above_threshold(loss, bias, expected, ratio):
    k, n = 4, 3
    lw, lh = _lambdas_at_ratio(k, n, ratio)
    opt = ufm_optimum(k, k, n, loss, lw, lh, 0.0, bias)
    assert opt.regime == "zero" and opt.a == 0
    assert float(opt.weight.abs().max()) == 0 and float(opt.features.abs().max()) == 0
    assert opt.objective == pytest.approx(expected, rel=1e-14)
    if bias:
        assert torch.equal(opt.bias, torch.full((k,), 0.25 if loss == "mse" else 0.0, dtype=F64))


def test_zero_regime_accepts_any_dim():
    lw, lh = _lambdas_at_ratio(5, 2, 1.2)
    opt = ufm_optimum(5, 2, 2, "ce", lw, lh)
    assert opt.regime == "zero" and opt.weight.shape == (5, 2)


@pytest.mark.parametrize(("k", "n", "lw", "lh"), POINTS)
def test_row_norm_and_objective_formulas(k, n, lw, lh):
    ratio = k * math.sqrt(n * lw * lh)
    scale = math.sqrt(n * lh / lw)
    s = (k - 1) * math.sqrt(n * lw * lh)
    a_ce = (k - 1) / k * scale * math.log((k - 1) * (1 - s) / s)
    ce = ufm_optimum(k, k, n, "ce", lw, lh, 1e-3)
    assert ce.a == pytest.approx(a_ce, rel=1e-13)
    t = math.log((k - 1) * (1 - s) / s)
    assert ce.objective == pytest.approx(math.log1p((k - 1) * math.exp(-t)) + s * t, rel=1e-13)
    mse = ufm_optimum(k, k, n, "mse", lw, lh, 0.0, bias=True)
    assert mse.a == pytest.approx((k - 1) / k * (scale - k * n * lh), rel=1e-12)
    frame = ufm_optimum(k, k, n, "mse", lw, lh, 0.0, bias=False)
    assert frame.a == pytest.approx(scale - k * n * lh, rel=1e-12)
    assert ratio < 1


# ---------------------------------------------------------------- structure of the optimum


@pytest.mark.parametrize(("loss", "bias", "lb"), SETTINGS)
def test_optimum_has_neural_collapse_structure(loss, bias, lb):
    k, d, n, lw, lh = 5, 7, 3, 2e-2, 5e-3
    opt = ufm_optimum(k, d, n, loss, lw, lh, lb, bias)
    w, h = opt.weight, opt.features
    torch.testing.assert_close(w.pow(2).sum(1), torch.full((k,), opt.a, dtype=F64))
    cosine = -1 / (k - 1) if opt.regime == "etf" else 0.0
    unit = w / w.norm(dim=1, keepdim=True)
    expected = torch.full((k, k), cosine, dtype=F64).fill_diagonal_(1.0)
    torch.testing.assert_close(unit @ unit.T, expected)
    assert torch.equal(opt.labels, _labels(k, n))
    c = math.sqrt(lw / (n * lh))
    torch.testing.assert_close(h, c * w[opt.labels])
    assert lw * float(w.pow(2).sum()) == pytest.approx(lh * float(h.pow(2).sum()), rel=1e-12)
    if opt.regime == "etf":
        torch.testing.assert_close(h.view(k, n, d).mean((0, 1)), torch.zeros(d, dtype=F64))


def test_optimum_dtype_and_objective_consistency():
    opt = ufm_optimum(4, 4, 3, "ce", 1e-2, 1e-2, 1e-2, dtype=torch.float32)
    assert opt.weight.dtype == opt.features.dtype == opt.bias.dtype == torch.float32
    value = ufm_objective(
        opt.weight.double(), opt.features.double(), opt.bias.double(), opt.labels,
        "ce", 1e-2, 1e-2, 1e-2,
    )
    assert float(value) == pytest.approx(opt.objective, rel=1e-6)


def test_objective_matches_explicit_formula():
    generator = torch.Generator().manual_seed(3)
    k, d, n = 3, 4, 2
    w = torch.randn(k, d, generator=generator, dtype=F64)
    h = torch.randn(k * n, d, generator=generator, dtype=F64)
    b = torch.randn(k, generator=generator, dtype=F64)
    labels = _labels(k, n)
    z = h @ w.T + b
    ce = sum(torch.logsumexp(z[i], 0) - z[i, labels[i]] for i in range(k * n)) / (k * n)
    mse = sum(0.5 * (z[i] - torch.eye(k, dtype=F64)[labels[i]]).pow(2).sum()
              for i in range(k * n)) / (k * n)
    reg = 0.5 * (0.1 * w.pow(2).sum() + 0.2 * h.pow(2).sum() + 0.3 * b.pow(2).sum())
    for loss, data in (("ce", ce), ("mse", mse)):
        value = ufm_objective(w, h, b, labels, loss, 0.1, 0.2, 0.3)
        torch.testing.assert_close(value, data + reg)
    no_bias = ufm_objective(w, h, None, labels, "mse", 0.1, 0.2, 0.3)
    z0 = h @ w.T
    expected = 0.5 * (z0 - torch.eye(k, dtype=F64)[labels]).pow(2).sum(1).mean()
    torch.testing.assert_close(no_bias, expected + reg - 0.15 * b.pow(2).sum())


# ---------------------------------------------------------------- Hessian probes


def _random_point(k, d, n, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(k, d, generator=generator, dtype=F64)
    h = scale * torch.randn(k * n, d, generator=generator, dtype=F64)
    b = torch.randn(k, generator=generator, dtype=F64)
    return w, h, b, _labels(k, n)


def _finite_difference_min_eig(f, x: torch.Tensor, eps: float = 1e-5) -> float:
    grad = torch.func.grad(f)
    columns = []
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        columns.append((grad(x + e) - grad(x - e)) / (2 * eps))
    hess = torch.stack(columns, dim=1)
    return float(torch.linalg.eigvalsh(0.5 * (hess + hess.T))[0])


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hessian_min_eig_matches_finite_differences(loss):
    k, d, n, lw, lh, lb = 3, 3, 2, 1e-2, 2e-2, 5e-3
    w, h, b, labels = _random_point(k, d, n)
    f, _ = _flat_objective(k, d, n, loss, lw, lh, lb, True)
    reference = _finite_difference_min_eig(f, torch.cat([w.flatten(), h.flatten(), b]))
    probe = ufm_hessian_min_eig(w, h, b, labels, loss, lw, lh, lb)
    assert probe == pytest.approx(reference, abs=1e-5)
    assert reference < -1e-3
    lanczos = ufm_hessian_min_eig(w, h, b, labels, loss, lw, lh, lb, dense_max=0, basis_size=8)
    assert lanczos == pytest.approx(probe, abs=1e-8)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hessian_at_origin_matches_closed_form(loss):
    k, d, n, lam = 3, 3, 2, 0.01
    w, h = torch.zeros(k, d, dtype=F64), torch.zeros(k * n, d, dtype=F64)
    b = torch.full((k,), 1 / k if loss == "mse" else 0.0, dtype=F64)
    value = ufm_hessian_min_eig(w, h, b, _labels(k, n), loss, lam, lam, 0.0)
    assert value == pytest.approx(0.01 - 1 / (3 * math.sqrt(2)), abs=1e-6)
    assert value == pytest.approx(-0.2257, abs=1e-4)
    assert value == pytest.approx(ufm_origin_min_eig(k, n, lam), abs=1e-10)


@pytest.mark.parametrize(("loss", "bias", "lb"), SETTINGS)
def test_no_negative_curvature_at_optimum(loss, bias, lb):
    opt = ufm_optimum(3, 3, 2, loss, 1e-2, 2e-2, lb, bias)
    value = ufm_hessian_min_eig(
        opt.weight, opt.features, opt.bias, opt.labels, loss, 1e-2, 2e-2, lb
    )
    assert value >= -1e-8
    assert value <= 1e-6


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_lanczos_mid_size_agrees_with_dense(loss):
    k, d, n, lw, lh, lb = 10, 10, 10, 1e-2, 2e-2, 5e-3
    w, h, b, labels = _random_point(k, d, n, seed=1, scale=0.3)
    args = (w, h, b, labels, loss, lw, lh, lb)
    lanczos = ufm_hessian_min_eig(*args)
    assert lanczos == pytest.approx(ufm_hessian_min_eig(*args, dense_max=10**4), abs=1e-8)
    restarted = ufm_hessian_min_eig(*args, basis_size=12, seed=5)
    assert restarted == pytest.approx(lanczos, abs=1e-8)
    assert ufm_hessian_min_eig(*args, seed=0) == lanczos


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_lanczos_mid_size_origin_and_optimum(loss):
    k, d, n, lam = 10, 10, 20, 1e-2
    b = torch.full((k,), 1 / k if loss == "mse" else 0.0, dtype=F64)
    zeros_w, zeros_h = torch.zeros(k, d, dtype=F64), torch.zeros(k * n, d, dtype=F64)
    origin = ufm_hessian_min_eig(zeros_w, zeros_h, b, _labels(k, n), loss, lam, lam, 0.0)
    assert origin == pytest.approx(ufm_origin_min_eig(k, n, lam), abs=1e-8)
    opt = ufm_optimum(k, d, n, loss, lam, 2 * lam, 0.0, True)
    at_opt = ufm_hessian_min_eig(
        opt.weight, opt.features, opt.bias, opt.labels, loss, lam, 2 * lam, 0.0
    )
    assert -1e-8 <= at_opt <= 1e-6


def test_hessian_min_eig_generic_quadratic():
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=F64))
    spectrum = torch.linspace(-2.0, 5.0, 300, dtype=F64)
    a = (q * spectrum) @ q.T
    x = torch.randn(300, generator=generator, dtype=F64)

    def quadratic(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = torch.cat([u.flatten(), v])
        return 0.5 * z @ a @ z

    value = hessian_min_eig(quadratic, [x[:200].view(10, 20), x[200:]], basis_size=40)
    assert value == pytest.approx(-2.0, abs=1e-8)
    linear = hessian_min_eig(lambda u: u.sum(), [x])
    assert linear == 0.0


def test_hessian_min_eig_warns_when_not_converged():
    spectrum = torch.linspace(-1.0, 1.0, 250, dtype=F64)

    def quadratic(u: torch.Tensor) -> torch.Tensor:
        return 0.5 * (spectrum * u * u).sum()

    with pytest.warns(RuntimeWarning, match="Lanczos stopped"):
        value = hessian_min_eig(quadratic, [torch.ones(250, dtype=F64)], num_iter=6, basis_size=4)
    assert -1.0 <= value < 0.0


def test_ufm_origin_min_eig_formula():
    assert ufm_origin_min_eig(3, 2, 0.01) == pytest.approx(0.01 - 1 / (3 * math.sqrt(2)))
    assert ufm_origin_min_eig(10, 100, 0.01) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the Lanczos probe at K = d = 1000 on the device")
def test_lanczos_on_gpu_large_origin():
    k, d, n, lam = 1000, 1000, 5, 1e-4
    device = torch.device("cuda")
    w = torch.zeros(k, d, dtype=torch.float32, device=device)
    h = torch.zeros(k * n, d, dtype=torch.float32, device=device)
    b = torch.full((k,), 1 / k, dtype=torch.float32, device=device)
    labels = _labels(k, n).to(device)
    value = ufm_hessian_min_eig(w, h, b, labels, "mse", lam, lam, 0.0)
    assert value == pytest.approx(ufm_origin_min_eig(k, n, lam), abs=1e-7)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"loss": "mse", "lambda_b": 1e-3, "bias": True}, "penalised bias"),
    ({"loss": "ce", "dim": 2}, "d >= K-1"),
    ({"loss": "mse", "bias": True, "dim": 2}, "d >= K-1"),
    ({"loss": "mse", "bias": False, "dim": 3}, "orthogonal frame"),
    ({"loss": "ce", "lambda_w": 0.0}, "must be > 0"),
    ({"loss": "mse", "lambda_h": -1e-3}, "must be > 0"),
    ({"loss": "ce", "lambda_b": -1e-3}, "lambda_b must be >= 0"),
    ({"loss": "hinge"}, "unknown loss"),
    ({"loss": "ce", "num_classes": 1}, "num_classes >= 2"),
])
def test_unsupported_inputs_raise(kwargs, match):
    base = {"num_classes": 4, "dim": 4, "n_per_class": 3, "lambda_w": 1e-2, "lambda_h": 1e-2}
    with pytest.raises(ValueError, match=match):
        ufm_optimum(**{**base, **kwargs})


def test_hessian_min_eig_rejects_empty_params():
    with pytest.raises(ValueError, match="at least one tensor"):
        hessian_min_eig(lambda: torch.zeros(()), [])
