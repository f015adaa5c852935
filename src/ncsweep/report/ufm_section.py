"""The report's UFM section: the theorem's evidence per (K, d, loss) cell, stated as evidence."""

from __future__ import annotations

import math

import pandas as pd

from ncsweep.report.document import Document
from ncsweep.report.tables import missing
from ncsweep.report.ufm import ufm_table

TABLE_NOTE = (
    "n counts random starts (a run of `arch.starts=R` counts R, any other UFM run one). at "
    "optimum: starts with f - f* <= probe_gap_tol against the closed form (- where none covers "
    "the cell); at best: starts within it of the best value found in their run; distinct: the "
    "most distinct final objective values of one run, two values being one where they differ "
    "by no more than the stopping rule can explain (tolerance: sqrt(P) x the gradient "
    "tolerance x the largest |x| of the starts, P parameters a start; 1e-9 relative for runs "
    "that did not record one), spread: the widest range of final values inside one of them; "
    "Hessian: the smallest eigenvalue probed at start 0 of each run; saddles / suspects: starts "
    "above tolerance with a vanishing gradient and negative curvature / and none (one above "
    "tolerance without a vanishing gradient has not converged); spurious basin <= : with no "
    "suspect in n starts, the rule of three bounds the chance that a random start ends in a "
    "spurious basin by 3/n at 95%. The per-start record of a batched run is its `starts.jsonl`.")
RENAMED = {"num_classes": "K", "feature_dim": "d", "d_over_k": "d/K", "n_optimum": "at optimum",
           "n_best": "at best", "distinct_values_max": "distinct",
           "distinct_spread_max": "spread", "hessian_min_eig_min": "Hessian min eig",
           "n_saddles": "saddles", "n_spurious_suspect": "suspects",
           "spurious_bound": "spurious basin <="}


def share(fraction: float) -> str:
    """A share in percent to one decimal: 997 of 1000 is 99.7%, never rounded up to 100%."""
    return f"{math.floor(1000 * fraction + 1e-9) / 10:g}%"


def ufm_section(doc: Document, runs: pd.DataFrame, has_figure: bool) -> None:
    """Counts, the no-spurious-minimum statement with its bound, the per-cell table, the figure."""
    table = ufm_table(runs)
    if table.empty:
        return
    doc.heading(2, "UFM landscape: every critical point at d = K is a global minimum or a "
                   "strict saddle")
    doc.bullets(_bullets(table))
    doc.paragraph(TABLE_NOTE)
    doc.table(_shown(table), index=False)
    if has_figure:
        doc.image("ufm.png", "UFM share of starts at the optimum, distinct values and worst "
                             "gap against d/K")


def _bullets(table: pd.DataFrame) -> list[str]:
    closed = table[table["optimum_share"].notna()]
    n, reached = int(closed["n"].sum()), int(closed["n_optimum"].sum())
    flagged = int(table["n_spurious_suspect"].sum())
    bullets = [f"random starts that reached the global optimum: {reached}/{n} "
               f"({share(reached / max(n, 1))})"]
    at_k = closed[closed["feature_dim"] == closed["num_classes"]]
    if not at_k.empty:
        k_n, k_reached = int(at_k["n"].sum()), int(at_k["n_optimum"].sum())
        bullets.append(f"at d = K: {k_reached}/{k_n} ({share(k_reached / k_n)}) in "
                       f"{len(at_k)} (K, loss) cell(s)")
    below = table[table["optimum_share"].isna()]
    if not below.empty:
        b_n, b_best = int(below["n"].sum()), int(below["n_best"].sum())
        bullets.append(f"without a closed form (d < K-1): {b_best}/{b_n} starts "
                       f"({share(b_best / b_n)}) at the best value their run found; "
                       f"up to {int(below['distinct_values_max'].max())} distinct final "
                       "values in one run")
    bullets.append(f"no spurious local minimum found: {'yes' if flagged == 0 else 'NO'} "
                   f"({flagged} suspect{'s' if flagged != 1 else ''}; "
                   f"{int(table['n_saddles'].sum())} start(s) above tolerance certified as "
                   "strict saddles: a vanishing gradient and negative curvature)")
    bullets += [_cell_evidence(cell) for _, cell in table.iterrows()]
    return bullets


def _cell_evidence(cell: pd.Series) -> str:
    """One cell's statement: its suspects, or the rule-of-three bound its clean starts give."""
    name = f"K={cell['num_classes']}, d={cell['feature_dim']}, {cell['loss']}"
    n, suspects = int(cell["n"]), int(cell["n_spurious_suspect"])
    if suspects:
        return f"{name}: {suspects} spurious-minimum suspect(s) in {n} starts: inspect them"
    return (f"{name}: no spurious minimum in {n} starts, so a random start lands in a spurious "
            f"basin with probability at most 3/{n} = {share(3 / n)} (95%, rule of three); "
            f"{int(cell['distinct_values_max'])} distinct final value(s) in one run")


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    shown = table.rename(columns=RENAMED)
    for column in ("gap_median", "gap_max", "Hessian min eig", "grad_norm_max", "spread"):
        shown[column] = shown[column].map(lambda v: "-" if missing(v) else f"{v:.3g}")
    shown["d/K"] = shown["d/K"].map(lambda v: f"{v:.3g}")
    shown["spurious basin <="] = shown["spurious basin <="].map(
        lambda v: "-" if missing(v) else share(v))
    shown["at optimum"] = [
        "-" if missing(s) else f"{int(count)} ({share(s)})"
        for count, s in zip(shown["at optimum"], shown["optimum_share"], strict=True)]
    shown["at best"] = [f"{int(count)} ({share(s)})"
                        for count, s in zip(shown["at best"], shown["best_share"], strict=True)]
    return shown.drop(columns=["optimum_share", "best_share", "reference", "distinct_tol"])
