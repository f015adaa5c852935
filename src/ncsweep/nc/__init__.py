"""Neural Collapse metrics, each key computed by its formula in docs/nc-metrics.md.

Keys from the reference table: ``nc1``, ``nc2_w``, ``nc2_m``, ``nc2_equinorm_w``,
``nc2_equinorm_m``, ``nc2_equiangle_w``, ``nc2_equiangle_m``, ``nc2_maxangle_w``,
``nc2_maxangle_m``, ``nc3``, ``nc3_duality``, ``nc4``, ``nc4_bias``. Extra keys:

- ``cdnv``: class-distance normalised variance (Galanti et al. 2022), the mean over pairs
  k < l of (var_k + var_l) / (2 ||mu_k - mu_l||^2), var_k = mean over class k of ||h - mu_k||^2.
- ``trace_ratio``: tr(Sigma_W) / tr(Sigma_B).
- ``w_norm_mean``, ``m_norm_mean``: mean row norm of W and of M (scale, not collapse).

Keys that see what the loss sees (section "Metrics that see what the loss sees"):

- ``nc1_rowspace``, ``nc2_m_rowspace``, ``nc3_duality_rowspace``, ``nc4_rowspace``: the key
  of the same name on h' = P_W h, P_W = W^+ W the orthogonal projector onto W's row space,
  with class and global means, Sigma_W and Sigma_B recomputed from h'. Components of h in W's
  null space never reach the loss. ``nc3`` and ``nc2_w`` need no variant (W P_W = W).
- ``nc2_of``: || G / ||G|| - I_K / sqrt(K) ||, G = Mbar Mbar^T with Mbar = [mu_k] the
  uncentred class means; 0 when the means form an orthogonal frame (one-hot means).
- ``nc4_test``: ``nc4`` on held-out data, argmax_k (W h + b)_k against the nearest class
  mean of the train set; from ``HeldOutNC4``, streamed over the test batches::

      test_nc4 = HeldOutNC4(train_accumulator, weight, bias)  # after update() over train
      for x, _ in test_batches: test_nc4.update(backbone(x))
      row["nc4_test"] = test_nc4.compute()

``KEYS`` are the keys of the first landing, ``ROWSPACE_KEYS`` the four row-space keys,
``COMPUTE_KEYS`` everything ``compute`` and ``nc_metrics`` return (KEYS, ROWSPACE_KEYS,
``nc2_of``), ``HELDOUT_KEYS`` = (``nc4_test``,). ``nc4_bias`` = ||W mu_G + b|| is not a
collapse measure where the loss is blind to a shift b + t 1 (CE without a bias penalty).

Conventions:

- Biases never enter NC1-NC3; ``nc4`` uses the full prediction W h + b; b = 0 when bias is None.
- ``nc2_equiangle_*`` and ``nc2_maxangle_*`` run over the K(K-1) ordered pairs k != l (the
  off-diagonal of the cosine matrix, as in Papyan et al.'s code). The mean is the same over
  unordered pairs; the ddof=1 std is not, and ordered pairs keep it defined at K = 2.
- Sigma_B^+: the rows of M satisfy sum_k n_k M_k = 0, so M = Q Q^T M with Q (K x K-1) an
  orthonormal basis of the complement of the counts n. Sigma_B = R^T R / K with R = Q^T M, so
  rank <= K-1 holds by construction. Its eigenvalues s_j^2 / K come from the SVD of R (K-1 x d);
  those at or below lambda_max * max(d, K) * eps(float64) are dropped, as
  ``numpy.linalg.pinv(Sigma_B, rcond=max(d, K) * eps, hermitian=True)`` would.
- All arithmetic is float64 on the device of the first batch. The NC1-NC3 state does not grow
  with N: class counts (K), class means (K x d), per-class sums of squared deviations (K) and
  one within-class scatter (d x d). Batches are converted to float64 in row chunks of at most
  2^22 elements (32 MiB), so no full float64 copy of the data is made. Each chunk is centred by
  its own class means before squaring and merged by Chan et al.'s parallel update
  (+ sum_k n_a n_b / (n_a + n_b) delta_k delta_k^T), which keeps NC1 accurate on nearly
  collapsed float32 features. The chunk's scatter is formed in upper block strips of at least
  128 columns (up to 4 blocks), as symmetry allows, which is cheaper than one full Gram.
- ``nc4`` needs the final class means. ``NCAccumulator.update`` keeps copies of the batches
  (input dtype, on the state's device) while features plus labels stay within
  ``max_feature_bytes``, and ``compute`` then gets ``nc4`` without a second pass. Past the
  budget the copies are dropped, and a second pass ``update_predictions`` over the same data is
  needed. Nearest centres minimise ||h - mu_k||^2 - ||h - mu_G||^2 = ||M_k||^2 + 2 mu_G.M_k
  - 2 h.M_k, an N x K float64 product (rounding ~ eps ||h|| ||M_k||, far below the gaps
  ||M_k - M_l||^2 unless the features' offset dwarfs the spread of the means by ~1e10). Exact
  ties in the logits or the distances resolve to the lowest class index in both.
- P_W = V_r V_r^T from the float64 SVD W = U S V^T, keeping the r singular values
  s > s_max * max(max(K, d) eps64, sqrt(min(K, d)) eps_W): the float64 SVD's own rounding
  (``torch.linalg.pinv``'s default) or the bound eps_W / 2 ||W|| of W's rounding to its own
  dtype, whichever is larger, so a float32 simplex-ETF head at d = K has rank K-1. The
  row-space keys are computed in the r coordinates V_r^T h (O(K d^2) for V_r^T Sigma_W V_r);
  when r = d, P_W = I and they equal the full keys exactly. ``nc4_rowspace`` comes with
  ``nc4`` (kept batches or ``update_predictions``): V_r^T h = S_r^-1 U_r^T (W h), so its
  centre scores follow from the logits by a K x K product while s_1 / s_r <= 1e4
  (``ROWSPACE_COND_LIMIT``, which bounds the precision this loses); past it, from K more rows
  2 M P_W in nc4's N x K product.
- Undefined metrics (zero-norm W, a zero row, coinciding class means, class means that
  differ only in W's null space, where W M^T = 0) raise ValueError instead of returning NaN.
"""

from __future__ import annotations

from ncsweep.nc.accumulator import (
    COMPUTE_KEYS,
    HELDOUT_KEYS,
    KEYS,
    ROWSPACE_KEYS,
    HeldOutNC4,
    NCAccumulator,
    nc_metrics,
)

__all__ = ["COMPUTE_KEYS", "HELDOUT_KEYS", "KEYS", "ROWSPACE_KEYS", "HeldOutNC4",
           "NCAccumulator", "nc_metrics"]
