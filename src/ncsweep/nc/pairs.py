"""The K x K parts of the NC metrics in square blocks of at most tile x tile entries.

Gram-vs-target distances, cosine statistics over the ordered pairs k != l and cdnv's pairs are
sums over the entries of G = A B^T; each block of G is formed, summed and dropped, so memory
stays O(tile^2) whatever K. Symmetric Grams visit only the blocks on and above the diagonal.
"""

from __future__ import annotations

import math

import torch

from ncsweep.nc.tensors import BLOCK_ELEMENTS, F64

RESCALE_LIMIT = 2.0**-20
CDNV_DIRECT_RATIO = 2.0**-4


def _blocks(k: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + tile, k)) for lo in range(0, k, tile)]


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x)
    return norm * norm


class _TargetDistance:
    """|| G / ||G|| - T || summed over blocks, T = diag I + off (11^T - I) with ||T|| = 1.

    Blocks are scaled by a provisional norm g (exact with one block, else from a d x d product);
    with r = g / ||G||, ||G / ||G|| - T||^2 = r^2 a + 2 r (r - 1) b + (r - 1)^2, a = ||G/g - T||^2,
    b = <G/g - T, T>, which keeps the digits of a near collapse; |r - 1| > RESCALE_LIMIT asks for
    a second pass with g = ||G||.
    """

    def __init__(self, g: torch.Tensor, diag: float, off: float) -> None:
        self.g = torch.where((g > 0) & torch.isfinite(g), g, torch.ones_like(g))
        self.inv = 1.0 / self.g
        self.diag, self.off = diag, off
        self.a = self.b = self.n2 = torch.zeros((), dtype=F64, device=g.device)

    def add(self, block: torch.Tensor, diagonal: bool, weight: float) -> None:
        if diagonal:
            dev = block * self.inv - self.off
            inner = self.off * dev.sum()
            dev.diagonal().sub_(self.diag - self.off)
            inner = inner + (self.diag - self.off) * dev.diagonal().sum()
            a = _sq_norm(dev)
        else:
            off_g = self.off * self.g
            a = torch.dist(block, off_g) ** 2 * self.inv**2
            inner = self.off * (block.sum() * self.inv - block.numel() * self.off)
        self.a = self.a + weight * a
        self.b = self.b + weight * inner
        self.n2 = self.n2 + weight * _sq_norm(block)

    def result(self, name: str, target: str) -> torch.Tensor | None:
        """The distance, or None when the provisional norm was too far off (redo with norm())."""
        if float(self.n2) == 0.0:
            raise ValueError(f"{name} is zero, so its distance to the {target} is undefined")
        r = self.g / self.norm()
        if abs(float(r) - 1.0) > RESCALE_LIMIT:
            return None
        return (r * r * self.a + 2.0 * r * (r - 1.0) * self.b + (r - 1.0) ** 2).clamp(min=0).sqrt()

    def norm(self) -> torch.Tensor:
        return self.n2.sqrt()


class _Cosines:
    """std (ddof=1) and mean |cos + 1/(K-1)| over ordered pairs, from sums shifted by cos_01."""

    def __init__(self, a: torch.Tensor, norms: torch.Tensor) -> None:
        k = a.shape[0]
        self.inv = 1.0 / norms
        self.shift = (a[0] @ a[1]) * self.inv[0] * self.inv[1]
        self.etf = torch.full((), -1.0 / (k - 1), dtype=F64, device=a.device)
        self.pairs = k * (k - 1)
        self.s1 = self.s2 = self.abs = torch.zeros((), dtype=F64, device=a.device)

    def add(self, block: torch.Tensor, rows: slice, cols: slice, diagonal: bool,
            weight: float) -> torch.Tensor:
        """Add a block of G; returns its cosines."""
        cos = block * self.inv[rows, None]
        cos.mul_(self.inv[None, cols])
        if diagonal:
            z = cos - self.shift
            z.diagonal().zero_()
            s1, s2 = z.sum(), _sq_norm(z)
            y = cos - self.etf
            y.diagonal().zero_()
            total = y.abs_().sum()
        else:
            s1 = cos.sum() - cos.numel() * self.shift
            s2 = torch.dist(cos, self.shift) ** 2
            total = torch.dist(cos, self.etf, p=1)
        self.s1 = self.s1 + weight * s1
        self.s2 = self.s2 + weight * s2
        self.abs = self.abs + weight * total
        return cos

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        var = (self.s2 - self.s1 * self.s1 / self.pairs) / (self.pairs - 1)
        return var.clamp(min=0).sqrt(), self.abs / self.pairs


class _Cdnv:
    """Mean over k < l of (var_k + var_l) / (2 ||m_k - m_l||^2), distances from the Gram.

    ||m_k||^2 + ||m_l||^2 - 2 m_k.m_l errs by at most ~2 (d + 4) eps (||m_k||^2 + ||m_l||^2);
    pairs whose distance is below CDNV_DIRECT_RATIO times that sum (only pairs with cosine
    above 1 - CDNV_DIRECT_RATIO can be) are recomputed directly as ||m_k - m_l||^2, so every
    pair keeps a relative error below ~32 (d + 4) eps.
    """

    def __init__(self, m: torch.Tensor, variances: torch.Tensor) -> None:
        self.m, self.var = m, variances
        self.sq = m.square().sum(dim=1)
        self.total = torch.zeros((), dtype=F64, device=m.device)
        self.first_zero: tuple[int, int] | None = None

    def add(self, block: torch.Tensor, cos: torch.Tensor, rows: slice, cols: slice,
            diagonal: bool) -> None:
        ones_r = torch.ones(block.shape[0], dtype=F64, device=block.device)
        ones_c = torch.ones(block.shape[1], dtype=F64, device=block.device)
        dist = torch.addr(block, self.sq[rows], ones_c, beta=-2.0).addr_(ones_r, self.sq[cols])
        candidates = cos > 1.0 - CDNV_DIRECT_RATIO
        if diagonal:
            upper = torch.ones_like(candidates).triu_(1)
            candidates &= upper
            dist.masked_fill_(~upper, 1.0)
        direct = torch.nonzero(candidates)
        if direct.numel():
            i, j = direct[:, 0], direct[:, 1]
            sums = self.sq[i + rows.start] + self.sq[j + cols.start]
            near = dist[i, j] < CDNV_DIRECT_RATIO * sums
            i, j = i[near], j[near]
            exact = self._direct(i + rows.start, j + cols.start)
            dist[i, j] = exact
            zero = torch.nonzero(exact == 0).flatten()
            if zero.numel():
                first = (int(i[zero[0]]) + rows.start, int(j[zero[0]]) + cols.start)
                self.first_zero = min(first, self.first_zero or first)
        inv = dist.reciprocal_()
        if diagonal:
            inv.triu_(1)
        self.total = self.total + self.var[rows] @ inv.sum(dim=1) + inv.sum(dim=0) @ self.var[cols]

    def _direct(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        step = max(1, BLOCK_ELEMENTS // self.m.shape[1])
        if i.numel() == 0:
            return torch.zeros(0, dtype=F64, device=self.m.device)
        parts = [(self.m[i[s:s + step]] - self.m[j[s:s + step]]).square().sum(dim=1)
                 for s in range(0, i.numel(), step)]
        return torch.cat(parts)

    def result(self) -> torch.Tensor:
        if self.first_zero is not None:
            i, j = self.first_zero
            raise ValueError(f"classes {i} and {j} have identical means, so cdnv is undefined")
        k = self.m.shape[0]
        return self.total / (k * (k - 1))


def _etf_values(k: int) -> tuple[float, float]:
    """Diagonal and off-diagonal entries of E = (I - 11^T / K) / sqrt(K - 1)."""
    return (1.0 - 1.0 / k) / math.sqrt(k - 1), -1.0 / (k * math.sqrt(k - 1))


def symmetric_pairs(
    a: torch.Tensor, tile: int, name: str, norms: torch.Tensor | None = None,
    variances: torch.Tensor | None = None, shift: torch.Tensor | None = None,
    gram_dd: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """From G = A A^T: "etf" (|| G/||G|| - E ||); with the row norms, "equiangle" and
    "maxangle" of the rows' cosines; with variances, "cdnv"; with shift mu, "of":
    || Gb/||Gb|| - I/sqrt(K) || for Gb the Gram of the rows of A + 1 mu^T, formed from G as
    G + p 1^T + 1 p^T + ||mu||^2 with p = A mu. gram_dd: A^T A where the caller has it."""
    k = a.shape[0]
    blocks = _blocks(k, tile)
    single = a @ a.T if len(blocks) == 1 else None
    p = q = None
    ones = torch.ones(k, dtype=F64, device=a.device)
    if shift is not None:
        p, q = a @ shift, shift @ shift
    if single is not None:
        g = torch.linalg.matrix_norm(single)
        g_of = None if p is None else torch.linalg.matrix_norm(single + p[:, None] + p + q)
    else:
        gram_dd = a.T @ a if gram_dd is None else gram_dd
        g = torch.linalg.matrix_norm(gram_dd)
        g_of = None
        if shift is not None:
            col = a.sum(dim=0)
            g_of = torch.linalg.matrix_norm(gram_dd + torch.outer(col, shift)
                                            + torch.outer(shift, col + k * shift))
    for _ in range(2):
        etf = _TargetDistance(g, *_etf_values(k))
        of = None if g_of is None else _TargetDistance(g_of, 1.0 / math.sqrt(k), 0.0)
        cos = None if norms is None else _Cosines(a, norms)
        cdnv = None if variances is None else _Cdnv(a, variances)
        for i, (lo, hi) in enumerate(blocks):
            for lo2, hi2 in blocks[i:]:
                rows, cols = slice(lo, hi), slice(lo2, hi2)
                block = single if single is not None else a[rows] @ a[cols].T
                diagonal, weight = lo == lo2, 1.0 if lo == lo2 else 2.0
                etf.add(block, diagonal, weight)
                cosines = None if cos is None else cos.add(block, rows, cols, diagonal, weight)
                if cdnv is not None:
                    cdnv.add(block, cosines, rows, cols, diagonal)
                if of is not None:
                    shifted = torch.addr(block, p[rows], ones[cols]).addr_(ones[rows], p[cols] + q)
                    of.add(shifted, diagonal, weight)
        out = {"etf": etf.result(name, "simplex ETF")}
        if of is not None:
            out["of"] = of.result("the Gram of the class means", "I_K")
        if all(v is not None for v in out.values()):
            break
        g, g_of = etf.norm(), None if of is None else of.norm()
    if cos is not None:
        out["equiangle"], out["maxangle"] = cos.result()
    if cdnv is not None:
        out["cdnv"] = cdnv.result()
    return out


def cdnv(m: torch.Tensor, variances: torch.Tensor, tile: int) -> torch.Tensor:
    """The mean over pairs k < l of (var_k + var_l) / (2 ||m_k - m_l||^2): from the exact
    differences where the K x K x d block is small, else from the tiled Gram (``_Cdnv``)."""
    k, d = m.shape
    if k * k * d > BLOCK_ELEMENTS:
        norms = torch.linalg.vector_norm(m, dim=1)
        return symmetric_pairs(m, tile, "M M^T", norms=torch.where(norms > 0, norms, 1.0),
                               variances=variances)["cdnv"]
    i, j = torch.triu_indices(k, k, 1, device=m.device)
    dist = (m[i] - m[j]).square().sum(dim=1)
    zero = torch.nonzero(dist == 0).flatten()
    if zero.numel():
        first = int(zero[0])
        raise ValueError(f"classes {int(i[first])} and {int(j[first])} have identical means, "
                         "so cdnv is undefined")
    return ((variances[i] + variances[j]) / (2.0 * dist)).mean()


def cross_etf_distance(
    a: torch.Tensor, b: torch.Tensor, tile: int, name: str,
    grams_dd: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """|| A B^T / ||A B^T|| - E || over all blocks of A B^T (A, B with K rows each); grams_dd:
    (A^T A, B^T B) where the caller has them, for the provisional norm <A^T A, B^T B>^(1/2)."""
    k = a.shape[0]
    blocks = _blocks(k, tile)
    single = a @ b.T if len(blocks) == 1 else None
    if single is not None:
        g = torch.linalg.matrix_norm(single)
    else:
        ata, btb = (a.T @ a, b.T @ b) if grams_dd is None else grams_dd
        g = (ata * btb).sum().clamp(min=0).sqrt()
    for _ in range(2):
        dist = _TargetDistance(g, *_etf_values(k))
        for lo, hi in blocks:
            for lo2, hi2 in blocks:
                block = single if single is not None else a[lo:hi] @ b[lo2:hi2].T
                dist.add(block, lo == lo2, 1.0)
        out = dist.result(name, "simplex ETF")
        if out is not None:
            return out
        g = dist.norm()
    raise AssertionError("the exact norm leaves no rescaling")
