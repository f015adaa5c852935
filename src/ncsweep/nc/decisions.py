"""nc4's decisions: argmax of W h + b against the nearest class centre, decided in float32 where
that is provably the float64 decision, and re-checked in float64 everywhere else."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ncsweep.nc.geometry import centred_means
from ncsweep.nc.tensors import (
    BLOCK_ELEMENTS,
    CHUNK_ELEMENTS,
    float64_chunks,
    ieee_float32_matmul,
)

logger = logging.getLogger(__name__)

U32 = 2.0**-24
U64 = 2.0**-53
UNDERFLOW32 = 2.0**-150
SAFETY = 1.0 + 2.0**-20
FLOAT32_MIN_CLASSES = 256


def _gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u), the classical bound on n roundings of unit roundoff u."""
    if n * u >= 1.0:
        return math.inf
    return n * u / (1.0 - n * u)


def _error_coefficients(d: int) -> tuple[float, float, float]:
    """(alpha, beta, eta) with |S32 - S| + |S64 - S| <= alpha ||x|| ||p|| + beta |c| + eta(x, p).

    S = x.p + c in exact arithmetic on the float64 inputs; S32 = fl32(fl32(c) + fl32(x).fl32(p))
    and S64 = fl64(c + x.p), in any order of summation (docstring of ncsweep.nc).
    """
    g32, g64 = _gamma(d + 1, U32), _gamma(d + 1, U64)
    alpha = g32 * (1.0 + U32) ** 2 + 2.0 * U32 + U32**2 + g64
    beta = g32 * (1.0 + U32) + U32 + g64
    return alpha, beta, (2.0 * d + 3.0) * UNDERFLOW32


@dataclass(frozen=True)
class Predictions:
    """Score sets [W; 2M; 2 M P_W] and offsets [b + W mu_G; -||M_k||^2; -||P_W M_k||^2] of the
    centred features x = h - mu_G: group 0 is the classifier, the others nearest centres."""

    mu_g: torch.Tensor
    proj: torch.Tensor
    offsets: torch.Tensor
    blocks32: tuple[tuple[int, torch.Tensor, torch.Tensor], ...]
    scale_x: torch.Tensor
    scale_1: torch.Tensor
    tile: int

    @classmethod
    def build(
        cls, counts: torch.Tensor, means: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
        basis: torch.Tensor | None, tile: int,
    ) -> Predictions:
        """nc4's centres M and, when given W's row-space basis V_r, nc4_rowspace's M P_W."""
        mu_g, m = centred_means(counts, means)
        proj, offsets = [w], [b + w @ mu_g]
        for c in (m,) if basis is None else (m, (m @ basis) @ basis.T):
            proj.append(2.0 * c)
            offsets.append(-c.square().sum(dim=1))
        proj_t, offsets_t = torch.stack(proj), torch.stack(offsets)
        alpha, beta, eta = _error_coefficients(w.shape[1])
        p_max = torch.linalg.vector_norm(proj_t, dim=2).amax(dim=1)
        c_max = offsets_t.abs().amax(dim=1)
        sqrt_d = math.sqrt(w.shape[1])
        scale_x = 2.0 * SAFETY * (alpha * p_max + 2.0 * sqrt_d * UNDERFLOW32)
        scale_1 = 2.0 * SAFETY * (beta * c_max + eta + 2.0 * sqrt_d * UNDERFLOW32 * p_max)
        k, d = w.shape
        blocks32 = tuple(
            (lo, offsets_t[:, lo:lo + tile].reshape(1, -1).float(),
             proj_t[:, lo:lo + tile].reshape(-1, d).float())
            for lo in range(0, k, tile)
        )
        return cls(mu_g, proj_t, offsets_t, blocks32, scale_x, scale_1, tile)

    @property
    def groups(self) -> int:
        """Number of score sets: the classifier, then one per centre set."""
        return self.proj.shape[0]

    def mismatches(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per centre set (M, then M P_W), the samples whose argmax W h + b is not the nearest;
        with ``labels``, one more entry: the samples whose nearest centre M_k is their label
        (the nearest-class-centre classifier's hits, decided by the same argmax)."""
        k = self.proj.shape[1]
        rows = min(max(self.tile, BLOCK_ELEMENTS // min(k, self.tile)),
                   max(1, CHUNK_ELEMENTS // self.proj.shape[2]))
        count = torch.zeros(self.groups - (labels is None), dtype=torch.int64,
                            device=self.proj.device)
        rechecked = 0
        with ieee_float32_matmul():
            for chunk, x in float64_chunks(feats, rows):
                x.sub_(self.mu_g)
                if k < FLOAT32_MIN_CLASSES:  # the N x K product is cheap: decide in float64
                    decided = self._float64_decisions(x)
                else:
                    decided, certain = self._float32_decisions(x)
                    doubtful = torch.nonzero(~certain).flatten()
                    if doubtful.numel():
                        decided[doubtful] = self._float64_decisions(x[doubtful])
                        rechecked += doubtful.numel()
                count[:self.groups - 1] += (decided[:, 1:] != decided[:, :1]).sum(dim=0)
                if labels is not None:
                    count[-1] += (decided[:, 1] == labels[chunk]).sum()
        logger.debug("nc4: %d of %d samples re-checked in float64", rechecked, feats.shape[0])
        return count

    def _float32_decisions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 argmax per group (rows, G) and whether each row's float32 argmaxes are certain.

        Certain: in every group the top-two gap exceeds twice the bound on |S32 - S| + |S64 - S|.
        """
        x32 = x.float()
        groups = self.groups
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for lo, offsets, proj in self.blocks32:
            block = torch.addmm(offsets, x32, proj.T).view(x.shape[0], groups, -1)
            values, index = block.topk(min(2, block.shape[2]), dim=2)
            best = (values, index + lo) if best is None else _merge_top2(best, (values, index + lo))
        values, index = best
        top = values.double()
        gap = top[..., 0] - top[..., 1]
        norms = torch.linalg.vector_norm(x, dim=1)
        if not bool(torch.isfinite(norms).all()):  # one N-vector instead of the N x d block
            raise ValueError("features contain NaN or inf")
        bound = norms[:, None] * self.scale_x + self.scale_1
        certain = (gap > bound) & torch.isfinite(top[..., 0])
        return index[..., 0], certain.all(dim=1)

    def _float64_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """Float64 argmax per group (rows, G) of the doubtful rows, in row blocks."""
        groups, k, d = self.proj.shape
        step = max(1, BLOCK_ELEMENTS // (groups * k))
        out = []
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            scores = torch.addmm(self.offsets.reshape(1, -1), chunk,
                                 self.proj.reshape(-1, d).T).view(-1, groups, k)
            if not bool(torch.isfinite(scores).all()):
                raise ValueError("features contain NaN or inf")
            out.append(scores.argmax(dim=2))
        return torch.cat(out)


def _merge_top2(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest entries of two running (values, indices) top-two lists."""
    values = torch.cat([a[0], b[0]], dim=2)
    index = torch.cat([a[1], b[1]], dim=2)
    top, where = values.topk(2, dim=2)
    return top, index.gather(2, where)
