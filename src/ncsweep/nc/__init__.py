"""Neural Collapse metrics, each key computed by its formula in docs/metrics.md.

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
  orthonormal basis of the complement of the counts n (the last K-1 columns of the Householder
  reflection of n / ||n||, applied in O(K d)). Sigma_B = R^T R / K with R = Q^T M, so
  rank <= K-1 holds by construction. Its eigenvalues s_j^2 / K come from the SVD of R (K-1 x d);
  those at or below lambda_max * max(d, K) * eps(float64) are dropped, as
  ``numpy.linalg.pinv(Sigma_B, rcond=max(d, K) * eps, hermitian=True)`` would.
- All results are float64, on the device of the first batch. The NC1-NC3 state does not grow
  with N: class counts (K), class means (K x d), per-class sums of squared deviations (K) and
  one within-class scatter (d x d). Batches are converted to float64 in row chunks of at most
  max(2^22 elements, 2K rows), so no full float64 copy of the data is made. Each chunk is centred by
  its own class means before squaring and merged by Chan et al.'s parallel update
  (+ sum_k n_a n_b / (n_a + n_b) delta_k delta_k^T, over the classes in both), which keeps
  NC1 accurate on nearly collapsed float32 features. The chunk's scatter is formed in upper
  block strips of at least 128 columns (up to 4 blocks), as symmetry allows, which is cheaper
  than one full Gram.
- ``nc4`` needs the final class means. ``NCAccumulator.update`` keeps copies of the batches
  (input dtype, on the state's device) while features plus labels stay within
  ``max_feature_bytes``, and ``compute`` then gets ``nc4`` without a second pass. Past the
  budget the copies are dropped, and a second pass ``update_predictions`` over the same data is
  needed. Scores are taken on centred features x = h - mu_G (float64): logits x.w_k + (b_k +
  w_k.mu_G), and nearest centres maximise 2 x.M_k - ||M_k||^2 (= ||x||^2 - ||x - M_k||^2), and
  for ``nc4_rowspace`` 2 x.(P_W M_k) - ||P_W M_k||^2. Exact ties resolve to the lowest index.
- nc4's decisions in float32, provably the float64 ones: each score S = x.p + c is formed in
  float32 from fl32(x), fl32(p), fl32(c) (IEEE float32 products are forced: no TF32/bf16). With
  u = 2^-24 and gamma_n = n u / (1 - n u), any summation order gives |S32 - S| <= gamma_{d+1}
  (1+u)^2 ||x|| ||p|| + (2u + u^2) ||x|| ||p|| (rounding x and p: |x^.p^ - x.p| <= (2u + u^2)
  |x|.|p|) + (gamma_{d+1} (1+u) + u) |c|, plus (2d + 3 + 2 sqrt(d) (||x|| + ||p||)) 2^-150 for
  underflow; the float64 computation errs by gamma_{d+1}(u64) (||x|| ||p|| + |c|). With P =
  max_k ||p_k|| and C = max_k |c_k| per score set, a sample's float32 argmax is kept when its
  top-two gap exceeds 2 (1 + 2^-20) times the sum of both bounds (the factor covers the
  float64 rounding of ||x||, P, C and the gap): then both computations share one argmax.
  Every other sample (gap within the bound, a float32 tie, overflow) is re-scored in float64,
  so the count equals the float64 computation's exactly. Below K = 256
  (``decisions.FLOAT32_MIN_CLASSES``) the N x K products are cheap next to the d x d scatter
  and every sample is scored in float64 directly.
- ``tile_size`` (``NCAccumulator``, ``nc_metrics``): the side of the square blocks in which
  every N x K and K x K product is formed and reduced: nc4's scores (samples x classes, a
  running top-two across class blocks), W W^T, M M^T and W M^T (the ETF distances, the cosine
  statistics, cdnv's pairs, nc2_of). Symmetric Grams visit the blocks on and above the
  diagonal. Default: K up to 1024, capped so a block's working set fits the free memory
  (CUDA's free memory, else MemAvailable). Peak memory is O(K d + d^2 + tile^2 + K), never
  O(N). With more than one block, ||G|| comes from a d x d product (||W W^T|| = ||W^T W||,
  ||W M^T||^2 = <W^T W, M^T M>) and is corrected exactly from the blocks' sum of squares (a
  second pass only if the two differ by more than 2^-20). The cosine std is a shifted sum
  (shift cos(row 0, row 1)); cdnv's distances ||m_k||^2 + ||m_l||^2 - 2 m_k.m_l are recomputed
  directly where they fall below 1/16 of ||m_k||^2 + ||m_l||^2.
- P_W = V_r V_r^T from the float64 SVD of W (through its R factor when K > d), keeping the r
  singular values s > s_max * max(max(K, d) eps64, sqrt(min(K, d)) eps_W): the float64 SVD's
  own rounding (``torch.linalg.pinv``'s default) or the bound eps_W / 2 ||W|| of W's rounding
  to its own dtype, whichever is larger, so a float32 simplex-ETF head at d = K has rank K-1.
  The row-space keys are computed in the r coordinates V_r^T h (O(K d^2) for V_r^T Sigma_W
  V_r); when r = d, P_W = I and they equal the full keys exactly.
- Across ranks (``torch.distributed``): each rank ``update``s its own shard, then
  ``NCAccumulator.all_reduce(group)`` replaces the pass-1 state by the group's with the same
  parallel merge (counts and n_k mu_k summed, each rank's scatter and squared deviations
  re-centred on the merged means, then summed): the metrics equal one process's over all
  shards, a class absent from some ranks included, and a rank without data takes part.
  Features are never gathered: each rank keeps its own (or, if any rank dropped them, all run
  the second pass over their own shard), counts its nc4 mismatches against the merged means,
  and ``compute`` sums the counts, so ``compute`` and the ``HeldOutNC4`` built after
  ``all_reduce`` are collective (every rank calls them). ``NCAccumulator.merge`` and
  ``HeldOutNC4.merge`` are the same merges between two objects in one process; outside a
  distributed run ``all_reduce`` does nothing.
- Undefined metrics (zero-norm W, a zero row, coinciding class means, class means that
  differ only in W's null space, where W M^T = 0) raise ValueError instead of returning NaN.
"""

from __future__ import annotations

from ncsweep.nc import decisions
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
           "NCAccumulator", "decisions", "nc_metrics"]
