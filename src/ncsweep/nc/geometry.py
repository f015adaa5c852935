"""The NC geometry from accumulated float64 state: NC1-NC3, the row space, nc2_of, cdnv."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ncsweep.nc.tensors import (
    EPS,
    F64,
)


class _RowSpace(NamedTuple):
    """W's row space: basis V_r (d x r) and coords = S_r^-1 U_r^T, with V_r^T h = coords W h."""

    basis: torch.Tensor
    coords: torch.Tensor
    condition: float


def _geometry_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sq_dev: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """NC1-NC3, nc4_bias and the extra keys from the accumulated float64 state."""
    mu_g, m = _centred_means(counts, means)
    trace_b = m.square().sum() / m.shape[0]
    if float(trace_b) == 0.0:
        raise ValueError("all class means coincide: Sigma_B is zero, so nc1 is undefined")
    w_norms, m_norms = _row_norms(w, "W"), _row_norms(m, "M (class mean minus global mean)")
    angles_w, angles_m = _angle_metrics(w, w_norms), _angle_metrics(m, m_norms)
    return {
        "nc1": _nc1(m, counts, sigma_w),
        "nc2_w": _etf_distance(w @ w.T, "W W^T"),
        "nc2_m": _etf_distance(m @ m.T, "M M^T"),
        "nc2_equinorm_w": w_norms.std(correction=1) / w_norms.mean(),
        "nc2_equinorm_m": m_norms.std(correction=1) / m_norms.mean(),
        "nc2_equiangle_w": angles_w[0],
        "nc2_equiangle_m": angles_m[0],
        "nc2_maxangle_w": angles_w[1],
        "nc2_maxangle_m": angles_m[1],
        "nc3": _etf_distance(w @ m.T, "W M^T"),
        "nc3_duality": (w / w.norm() - m / m.norm()).square().sum(),
        "nc4_bias": torch.linalg.vector_norm(w @ mu_g + b),
        "cdnv": _cdnv(m, sq_dev / counts),
        "trace_ratio": sigma_w.trace() / trace_b,
        "w_norm_mean": w_norms.mean(),
        "m_norm_mean": m_norms.mean(),
    }


def _rowspace(w: torch.Tensor, weight_eps: float) -> _RowSpace | None:
    """W's row space from its SVD, P_W = V_r V_r^T; None when r = d (P_W = I)."""
    k, d = w.shape
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rtol = max(max(k, d) * EPS, math.sqrt(min(k, d)) * weight_eps)
    rank = int((s > s[0] * rtol).sum())
    if rank == d:
        return None
    s_r = s[:rank]
    condition = float(s_r[0] / s_r[-1]) if rank else math.inf
    return _RowSpace(vh[:rank].T, u[:, :rank].T / s_r[:, None], condition)


def _rowspace_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    basis: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """nc1, nc2_m, nc3_duality of P_W h, in the coordinates V_r^T h of W's row space."""
    k, d = means.shape
    m_r = _centred_means(counts, means)[1] @ basis
    m_p = m_r @ basis.T
    return {
        "nc1_rowspace": _nc1(m_r, counts, basis.T @ sigma_w @ basis, cutoff_dim=max(d, k)),
        "nc2_m_rowspace": _etf_distance(m_r @ m_r.T, "M P_W (M P_W)^T"),
        "nc3_duality_rowspace": (w / w.norm() - m_p / m_p.norm()).square().sum(),
    }


def _centred_means(counts: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-weighted global mean mu_G and M = [mu_k - mu_G], re-centred once for accuracy."""
    n_total = counts.sum()
    mu_g = counts @ means / n_total
    m = means - mu_g
    correction = counts @ m / n_total
    return mu_g + correction, m - correction


def _nc1(
    m: torch.Tensor, counts: torch.Tensor, sigma_w: torch.Tensor, cutoff_dim: int | None = None
) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K through the SVD of M restricted to the complement of counts.

    The pseudo-inverse drops eigenvalues at or below max(cutoff_dim, K) eps times the largest;
    cutoff_dim defaults to M's width d.
    """
    k, d = m.shape
    d = d if cutoff_dim is None else cutoff_dim
    q = torch.linalg.qr(counts[:, None], mode="complete").Q[:, 1:]
    s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)[1:]
    eig = s.square() / k
    keep = eig > eig[0] * max(d, k) * EPS
    inverse = torch.where(keep, 1.0 / torch.where(keep, eig, 1.0), 0.0)
    quadratic = ((vh @ sigma_w) * vh).sum(dim=1)
    return (quadratic * inverse).sum() / k


def _simplex_etf(k: int, like: torch.Tensor) -> torch.Tensor:
    """E = (I - 11^T / K) / sqrt(K - 1), the normalised simplex-ETF Gram matrix."""
    eye = torch.eye(k, dtype=F64, device=like.device)
    return (eye - 1.0 / k) / math.sqrt(k - 1)


def _etf_distance(gram: torch.Tensor, name: str) -> torch.Tensor:
    """|| G / ||G|| - E ||, the distance of a normalised K x K product from the simplex ETF."""
    return _normalised_distance(gram, _simplex_etf(gram.shape[0], gram), name, "simplex ETF")


def _normalised_distance(
    gram: torch.Tensor, target: torch.Tensor, name: str, target_name: str
) -> torch.Tensor:
    """|| G / ||G|| - T || for a unit-norm target Gram matrix T, refusing G = 0."""
    norm = torch.linalg.matrix_norm(gram)
    if float(norm) == 0.0:
        raise ValueError(f"{name} is zero, so its distance to the {target_name} is undefined")
    return torch.linalg.matrix_norm(gram / norm - target)


def _orthogonal_frame_distance(means: torch.Tensor) -> torch.Tensor:
    """nc2_of: || G / ||G|| - I / sqrt(K) || for G the Gram of the uncentred class means."""
    k = means.shape[0]
    eye = torch.eye(k, dtype=F64, device=means.device) / math.sqrt(k)
    return _normalised_distance(means @ means.T, eye, "the Gram of the class means", "I_K")


def _row_norms(x: torch.Tensor, name: str) -> torch.Tensor:
    """Row norms, refusing exact zeros, for which cosines are undefined."""
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(
            f"row {int(zero[0, 0])} of {name} is zero, so the cosines of nc2 are undefined"
        )
    return norms


def _angle_metrics(x: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(std, mean |cos + 1/(K-1)|) of cos(x_k, x_l) over the K(K-1) ordered pairs k != l."""
    k = x.shape[0]
    cos = (x @ x.T) / (norms[:, None] * norms[None, :])
    off = cos[~torch.eye(k, dtype=torch.bool, device=x.device)]
    return off.std(correction=1), (off + 1.0 / (k - 1)).abs().mean()


def _cdnv(m: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """Mean over k < l of (var_k + var_l) / (2 ||mu_k - mu_l||^2)."""
    dist = torch.cdist(m, m, compute_mode="donot_use_mm_for_euclid_dist").square()
    rows, cols = torch.triu_indices(m.shape[0], m.shape[0], offset=1, device=m.device)
    pair_dist = dist[rows, cols]
    same = torch.nonzero(pair_dist == 0)
    if same.numel():
        i = int(same[0, 0])
        raise ValueError(
            f"classes {int(rows[i])} and {int(cols[i])} have identical means, so cdnv is undefined"
        )
    return ((variances[rows] + variances[cols]) / (2.0 * pair_dist)).mean()


