"""The UFM section: per (K, d, loss), the share of random starts that reached the global optimum."""

from __future__ import annotations

import math

import pandas as pd

from ncsweep.report.conditions import flag, numeric
from ncsweep.report.stats import rule_of_three

UFM_KEYS = ("num_classes", "feature_dim", "loss")
UFM_TABLE = (*UFM_KEYS, "d_over_k", "runs", "n", "reference", "n_optimum", "optimum_share",
             "n_best", "best_share", "distinct_values_max", "distinct_spread_max",
             "distinct_tol", "gap_median", "gap_max", "hessian_min_eig_min", "grad_norm_max",
             "n_saddles", "n_spurious_suspect", "spurious_bound")


def ufm_starts(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished UFM runs with their start counts; a run without ``starts`` is one start.

    ``n_optimum`` is ``n_reached_optimum`` (batched starts) or ``reached_global_optimum`` as
    0/1, NaN where no closed form covers the run; ``n_best`` counts the starts at the best
    value found (``n_reached_best``; a single start is at its own best);
    ``reference`` is ``closed_form`` or ``best_found``.
    """
    ufm = runs[(runs["arch"] == "ufm") & (runs["status"] == "done")].copy()
    single = numeric(ufm, "starts").isna()
    starts = numeric(ufm, "starts").fillna(1.0)
    gap = numeric(ufm, "objective_gap")
    closed = ~gap.isna() | numeric(ufm, "n_reached_optimum").notna()
    n_optimum = numeric(ufm, "n_reached_optimum").where(
        ~single, flag(ufm, "reached_global_optimum").astype(float))
    suspects = numeric(ufm, "n_spurious_suspect").where(
        ~single, flag(ufm, "spurious_minimum_suspect").astype(float))
    return ufm.assign(
        starts=starts, d_over_k=numeric(ufm, "feature_dim") / numeric(ufm, "num_classes"),
        reference=closed.map({True: "closed_form", False: "best_found"}),
        n_optimum=n_optimum.where(closed), n_best=numeric(ufm, "n_reached_best").fillna(starts),
        distinct=numeric(ufm, "distinct_objective_values").fillna(1.0),
        spread=numeric(ufm, "distinct_value_spread").where(~single, 0.0),
        distinct_tol=numeric(ufm, "distinct_value_tol"),
        gap_mid=numeric(ufm, "objective_gap_median").fillna(gap),
        gap_top=numeric(ufm, "objective_gap_max").fillna(gap),
        grad_top=numeric(ufm, "grad_norm_max").fillna(numeric(ufm, "grad_norm")),
        saddles=numeric(ufm, "n_certified_saddles").fillna(0.0),
        suspects=suspects.fillna(0.0), eig=numeric(ufm, "hessian_min_eig"))


def ufm_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (K, d, loss) of finished UFM runs: starts at the optimum, distinct values, curvature.

    ``n`` counts starts (a run with ``starts`` R counts R); ``optimum_share`` is the share
    of starts with gap <= tolerance against the closed-form f* (NaN where none covers the
    cell, below d = K-1), ``best_share`` the share at the best value found in each run;
    ``distinct_values_max`` the most distinct final values of a run (beyond the tolerance its
    stopping rule cannot resolve, ``distinct_tol``; 1e-9 relative for runs that predate it),
    ``distinct_spread_max`` the widest spread inside one of them; ``spurious_bound`` the rule
    of three, 3/n: with no suspect in n starts, the 95% upper bound on the chance that a
    random start ends in a spurious basin (NaN where a suspect was found);
    ``gap_median`` the median over runs of each run's median gap; ``hessian_min_eig_min``
    the smallest probe of start 0 (the only start of a single-start run); ``n_saddles`` the
    starts above tolerance certified by negative curvature.
    """
    ufm = ufm_starts(runs)
    if ufm.empty:
        return pd.DataFrame(columns=list(UFM_TABLE))
    grouped = ufm.groupby(list(UFM_KEYS), sort=True)
    table = pd.DataFrame({
        "d_over_k": grouped["d_over_k"].first(), "runs": grouped.size(),
        "n": grouped["starts"].sum().astype(int),
        "reference": grouped["reference"].agg(lambda v: "/".join(sorted(set(v)))),
        "n_optimum": grouped["n_optimum"].sum(min_count=1),
        "n_best": grouped["n_best"].sum(),
        "distinct_values_max": grouped["distinct"].max().astype(int),
        "distinct_spread_max": grouped["spread"].max(),
        "distinct_tol": grouped["distinct_tol"].max(),
        "gap_median": grouped["gap_mid"].median(), "gap_max": grouped["gap_top"].max(),
        "hessian_min_eig_min": grouped["eig"].min(), "grad_norm_max": grouped["grad_top"].max(),
        "n_saddles": grouped["saddles"].sum().astype(int),
        "n_spurious_suspect": grouped["suspects"].sum().astype(int),
    }).reset_index()
    closed_starts = ufm[ufm["n_optimum"].notna()].groupby(list(UFM_KEYS))["starts"].sum()
    keys = list(table[list(UFM_KEYS)].itertuples(index=False, name=None))
    table["optimum_share"] = [table.loc[i, "n_optimum"] / closed_starts[key]
                              if key in closed_starts.index else math.nan
                              for i, key in enumerate(keys)]
    table["best_share"] = table["n_best"] / table["n"]
    table["spurious_bound"] = [rule_of_three(n) if suspects == 0 and n > 0 else math.nan
                               for n, suspects in zip(table["n"], table["n_spurious_suspect"],
                                                      strict=True)]
    return table[list(UFM_TABLE)]


def ufm_suspects(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs flagged spurious_minimum_suspect: possible counterexamples to the theorem."""
    flagged = flag(runs, "spurious_minimum_suspect")
    return runs[flagged & (runs["status"] == "done")].reset_index(drop=True)


