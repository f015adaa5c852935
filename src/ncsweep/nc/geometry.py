"""The NC geometry from accumulated float64 state: NC1-NC3, the row space, nc2_of, cdnv, and
the classifier-free keys of any layer (separation_metrics)."""

from __future__ import annotations

import math

import torch

from ncsweep.nc.pairs import cdnv, cross_etf_distance, symmetric_pairs
from ncsweep.nc.tensors import EPS


def geometry_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sq_dev: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    tile: int,
) -> dict[str, torch.Tensor]:
    """NC1-NC3, nc4_bias, nc2_of and the extra keys from the accumulated float64 state."""
    mu_g, m = centred_means(counts, means)
    trace_b = m.square().sum() / m.shape[0]
    if float(trace_b) == 0.0:
        raise ValueError("all class means coincide: Sigma_B is zero, so nc1 is undefined")
    w_norms, m_norms = _row_norms(w, "W"), _row_norms(m, "M (class mean minus global mean)")
    grams = (w.T @ w, m.T @ m) if m.shape[0] > tile else (None, None)
    pairs_w = symmetric_pairs(w, tile, "W W^T", norms=w_norms, gram_dd=grams[0])
    pairs_m = symmetric_pairs(m, tile, "M M^T", norms=m_norms, variances=sq_dev / counts,
                               shift=mu_g, gram_dd=grams[1])
    return {
        "nc1": _nc1(m, counts, sigma_w),
        "nc2_w": pairs_w["etf"],
        "nc2_m": pairs_m["etf"],
        "nc2_equinorm_w": w_norms.std(correction=1) / w_norms.mean(),
        "nc2_equinorm_m": m_norms.std(correction=1) / m_norms.mean(),
        "nc2_equiangle_w": pairs_w["equiangle"],
        "nc2_equiangle_m": pairs_m["equiangle"],
        "nc2_maxangle_w": pairs_w["maxangle"],
        "nc2_maxangle_m": pairs_m["maxangle"],
        "nc3": cross_etf_distance(w, m, tile, "W M^T", None if grams[0] is None else grams),
        "nc3_duality": (w / w.norm() - m / m.norm()).square().sum(),
        "nc4_bias": torch.linalg.vector_norm(w @ mu_g + b),
        "cdnv": pairs_m["cdnv"],
        "trace_ratio": sigma_w.trace() / trace_b,
        "w_norm_mean": w_norms.mean(),
        "m_norm_mean": m_norms.mean(),
        "nc2_of": pairs_m["of"],
    }


def separation_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sq_dev: torch.Tensor,
    weighted: torch.Tensor,
    tile: int,
) -> dict[str, torch.Tensor]:
    """nc1, cdnv and trace_ratio, the keys that need no classifier, so any layer has them.

    ``weighted`` holds v^T Sigma_W v times the inverted eigenvalue for each row v of
    ``between_inverse``'s basis, so no d x d Sigma_W is needed; tr(Sigma_W) is sum(sq_dev) / N.
    They equal ``geometry_metrics``' keys of the same name; a zero row of M (a class mean at the
    global mean) is allowed here, since none of the three needs its direction.
    """
    m = centred_means(counts, means)[1]
    trace_b = m.square().sum() / m.shape[0]
    if float(trace_b) == 0.0:
        raise ValueError("all class means coincide: Sigma_B is zero, so nc1 is undefined")
    return {
        "nc1": weighted.sum() / m.shape[0],
        "cdnv": cdnv(m, sq_dev / counts, tile),
        "trace_ratio": sq_dev.sum() / counts.sum() / trace_b,
    }


def _right_singular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors (rows of V^T) of x, through its R factor when
    x is tall (O(rows d^2) instead of a full SVD's larger constant)."""
    if x.shape[0] > x.shape[1]:
        x = torch.linalg.qr(x, mode="r").R
    s, vh = torch.linalg.svd(x, full_matrices=False)[1:]
    return s, vh


def rowspace(w: torch.Tensor, weight_eps: float) -> torch.Tensor | None:
    """W's row-space basis V_r (d x r) from its SVD, P_W = V_r V_r^T; None when r = d (P_W = I)."""
    k, d = w.shape
    s, vh = _right_singular(w)
    rtol = max(max(k, d) * EPS, math.sqrt(min(k, d)) * weight_eps)
    rank = int((s > s[0] * rtol).sum())
    return None if rank == d else vh[:rank].T


def rowspace_metrics(
    counts: torch.Tensor,
    means: torch.Tensor,
    sigma_w: torch.Tensor,
    w: torch.Tensor,
    basis: torch.Tensor,
    tile: int,
) -> dict[str, torch.Tensor]:
    """nc1, nc2_m, nc3_duality of P_W h, in the coordinates V_r^T h of W's row space."""
    k, d = means.shape
    m_r = centred_means(counts, means)[1] @ basis
    m_p = m_r @ basis.T
    return {
        "nc1_rowspace": _nc1(m_r, counts, basis.T @ sigma_w @ basis, cutoff_dim=max(d, k)),
        "nc2_m_rowspace": symmetric_pairs(m_r, tile, "M P_W (M P_W)^T")["etf"],
        "nc3_duality_rowspace": (w / w.norm() - m_p / m_p.norm()).square().sum(),
    }


def centred_means(counts: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-weighted global mean mu_G and M = [mu_k - mu_G], re-centred once for accuracy."""
    n_total = counts.sum()
    mu_g = counts @ means / n_total
    m = means - mu_g
    correction = counts @ m / n_total
    return mu_g + correction, m - correction


def _complement(counts: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q^T M for Q (K x K-1) an orthonormal basis of the complement of the counts: rows 2..K of
    H M, H = I - 2 v v^T / v^T v the Householder reflection taking n / ||n|| to -e_1."""
    v = counts / torch.linalg.vector_norm(counts)
    v[0] += 1.0
    return m[1:] - (2.0 / (v @ v)) * v[1:, None] * (v @ m)[None, :]


def between_inverse(
    m: torch.Tensor, counts: torch.Tensor, cutoff_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma_B^+ = V^T diag(inverse) V: the rows V (min(K-1, d) x d) from the SVD of M
    restricted to the complement of counts, and the inverted eigenvalues, 0 where dropped.

    The pseudo-inverse drops eigenvalues at or below max(cutoff_dim, K) eps times the largest;
    cutoff_dim defaults to M's width d.
    """
    k, d = m.shape
    d = d if cutoff_dim is None else cutoff_dim
    s, vh = _right_singular(_complement(counts, m))
    eig = s.square() / k
    keep = eig > eig[0] * max(d, k) * EPS
    return vh, torch.where(keep, 1.0 / torch.where(keep, eig, 1.0), 0.0)


def _nc1(
    m: torch.Tensor, counts: torch.Tensor, sigma_w: torch.Tensor, cutoff_dim: int | None = None
) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K through ``between_inverse``."""
    vh, inverse = between_inverse(m, counts, cutoff_dim)
    quadratic = ((vh @ sigma_w) * vh).sum(dim=1)
    return (quadratic * inverse).sum() / m.shape[0]


def _row_norms(x: torch.Tensor, name: str) -> torch.Tensor:
    """Row norms, refusing exact zeros, for which cosines are undefined."""
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(
            f"row {int(zero[0, 0])} of {name} is zero, so the cosines of nc2 are undefined"
        )
    return norms
