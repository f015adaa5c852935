"""Building the report (the document, runs.csv, figures) and publishing it all or nothing."""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ncsweep.keys import COMPARED, NOT_EXPERIMENT, NOT_EXPERIMENT_PREFIXES
from ncsweep.report.claims import (
    COLLAPSE_FLOOR,
    COLLAPSE_REL_TOL,
    DEFAULT_GROUP_BY,
    TOLERANCE_PTS,
    claim_verdicts,
    claims_table,
    not_averaged,
    other_settings,
    repeated_seeds,
    row_keys,
    shown_counts,
)
from ncsweep.report.conditions import NONE
from ncsweep.report.document import Document
from ncsweep.report.figures import curves_figure, resources_figure, save_png, ufm_figure
from ncsweep.report.tables import format_claims, format_rowspace, missing
from ncsweep.report.ufm import ufm_suspects, ufm_table

_SLUG = re.compile(r"[^A-Za-z0-9_.+-]+")
STATUS_ORDER = ("done", "failed", "running", "dry_run", "unreadable")


def groups_of(table: pd.DataFrame, group_by: Sequence[str]) -> list[dict]:
    """The sections of a claims table, in table order: group values and condition."""
    keys = row_keys(table, group_by)
    unique = table[keys].drop_duplicates().itertuples(index=False, name=None)
    return [dict(zip(keys, values, strict=True)) for values in unique]


def slug(group: dict) -> str:
    """A file-name-safe name for a section, e.g. ``digits-mlp-ce`` (a "none" condition left out)."""
    values = [v for k, v in group.items() if not (k == "condition" and v == NONE)]
    return _SLUG.sub("_", "-".join(str(v) for v in values)).strip("_") or "all"


def section_title(group: dict, siblings: int = 1) -> str:
    """``dataset=digits / arch=mlp / loss=ce: exp``; "none" is named only among siblings."""
    title = " / ".join(f"{k}={v}" for k, v in group.items() if k != "condition")
    condition = group.get("condition", NONE)
    return title if condition == NONE and siblings < 2 else f"{title}: {condition}"


def make_figures(runs: pd.DataFrame, history: pd.DataFrame, table: pd.DataFrame,
                 group_by: Sequence[str]) -> dict[str, Figure]:
    """Every figure of the report by file name: curves and resources per group, the UFM plot."""
    made: dict[str, Figure] = {}
    for group in groups_of(table, group_by):
        name = slug(group)
        if not history.empty:
            made[f"curves-{name}.png"] = curves_figure(runs, history, group, group_by)
        made[f"resources-{name}.png"] = resources_figure(table, group)
    ufm = ufm_figure(runs)
    if ufm is not None:
        made["ufm.png"] = ufm
    return made


def build_document(runs: pd.DataFrame, table: pd.DataFrame, verdicts: pd.DataFrame,
                   figure_names: Sequence[str], group_by: Sequence[str],
                   sources: Sequence[str]) -> Document:
    """report.md / report.html content: counts, claims per group, UFM landscape, runs apart."""
    doc = Document("Neural Collapse sweep report")
    _overview(doc, runs, sources)
    _suspect_alarm(doc, runs)
    if not table.empty:
        _claims_section(doc, runs, table, verdicts, figure_names, group_by)
    _ufm_section(doc, runs, "ufm.png" in figure_names)
    _apart_section(doc, runs)
    doc.rule()
    doc.paragraph(f"Written by `python -m ncsweep.report` on {time.strftime('%Y-%m-%d %H:%M')}. "
                  "Runs are read from their run folders (identity from run.json, results from "
                  "summary.json and metrics.jsonl, markers) through ncsweep.tracking, or from "
                  "W&B runs mapped onto the same columns. "
                  "Every run is one row of runs.csv.")
    return doc


def _overview(doc: Document, runs: pd.DataFrame, sources: Sequence[str]) -> None:
    counts = runs["status"].value_counts()
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in STATUS_ORDER if s in counts]
    doc.paragraph(f"Sources: {', '.join(f'`{s}`' for s in sources) or '-'}")
    doc.paragraph(f"**{len(runs)} runs**: {', '.join(parts)}. Only finished (done) runs are "
                  "averaged; the others are listed apart at the end.")


def _suspect_alarm(doc: Document, runs: pd.DataFrame) -> None:
    suspects = ufm_suspects(runs)
    if suspects.empty:
        return
    doc.warning(f"**{len(suspects)} UFM run(s) flagged spurious_minimum_suspect**: gradient "
                "near zero, objective above the global optimum and no negative curvature found. "
                "Either a counterexample to the d = K theorem or a numerical problem: "
                "inspect these runs.")
    doc.bullets([f"`{p}` (K={k}, d={d}, {loss}, seed {s}, gap {g:.3g})" for p, k, d, loss, s, g in
                 suspects[["path", "num_classes", "feature_dim", "loss", "seed",
                           "objective_gap"]].itertuples(index=False, name=None)])


def _claims_section(doc: Document, runs: pd.DataFrame, table: pd.DataFrame,
                    verdicts: pd.DataFrame, figure_names: Sequence[str],
                    group_by: Sequence[str]) -> None:
    doc.heading(2, "Claims: a fixed simplex-ETF head at d = K against a learned head at large d")
    doc.paragraph("Baseline: a learned head at the largest d of the condition. \"d=K\" means "
                  "feature_dim equals num_classes. Cells are mean ± std over seeds (ddof=1) of "
                  "finished runs at the end of training; parameter counts are the one value "
                  "of the cell's runs, or the range min-max they span, never a mean; "
                  "NC2 is `nc2_m` (class means against "
                  "the simplex ETF); accuracies are in percent, differences in points. "
                  "Collapse: NC1, NC2 (nc2_m) and NC3 are each judged against the baseline, and "
                  "for the frozen ETF head also their row-space variants (features projected "
                  "onto the span of the head's rows, all the loss sees) where logged; a metric "
                  f"passes within {100 * COLLAPSE_REL_TOL:g}% of the baseline or below "
                  f"{COLLAPSE_FLOOR:g}. Memory: the CUDA peak where both sides ran on a GPU, "
                  "else train_memory_bytes (parameters, gradients, optimizer state and saved "
                  "activations of one step).")
    doc.paragraph(CONDITIONS_TEXT)
    _accounting(doc, runs, table, group_by)
    for note in repeated_seeds(runs, group_by):
        doc.warning(note)
    others = other_settings(runs, group_by)
    if others:
        doc.paragraph(f"Finished runs in other settings, not in the table: {', '.join(others)}.")
    sections = groups_of(table, group_by)
    for group in sections:
        siblings = sum(all(other[k] == v for k, v in group.items() if k != "condition")
                       for other in sections)
        title = section_title(group, siblings)
        doc.heading(3, title)
        mask = (verdicts[list(group)] == pd.Series(group)).all(axis=1)
        doc.bullets(list(verdicts.loc[mask, "text"]))
        doc.table(format_claims(table, group))
        rowspace = format_rowspace(table, group)
        if rowspace is not None:
            doc.paragraph("Row-space metrics (features projected onto the row space of the "
                          "head's weights, what a frozen head's loss sees):")
            doc.table(rowspace)
        for prefix, alt in (("curves", "NC metrics and accuracy per epoch"),
                            ("resources", "parameters and peak memory")):
            name = f"{prefix}-{slug(group)}.png"
            if name in figure_names:
                doc.image(name, f"{title}: {alt}")


def _spoken(items: Sequence[str]) -> str:
    """``a, b and c``."""
    return f"{', '.join(items[:-1])} and {items[-1]}" if len(items) > 1 else "".join(items)


CONDITIONS_TEXT = (
    "A cell averages only runs that differ in nothing but the seed. Runs that differ in anything "
    "else they record are separate sections (conditions), named by what tells them apart (e.g. "
    "`dataset.imbalance=exp`; \"none\" where none of those values is set): the overrides of "
    f"the job other than {_spoken(COMPARED)} (the `variant` column of runs.csv; "
    f"{_spoken([*NOT_EXPERIMENT, *(p + '*' for p in NOT_EXPERIMENT_PREFIXES)])} do not change "
    "the experiment), num_classes, and every text or yes/no value of run.json and summary.json "
    "(dataset, optim, schedule, embedding, data variant, weights, freeze, ...), bookkeeping "
    "such as paths, status and device aside. A missing value is a value of its own (\"none\"); "
    "only a head option a head does not have (the ETF embedding on a learned head) and values a "
    "run that did not finish never recorded match any condition.")


def _accounting(doc: Document, runs: pd.DataFrame, table: pd.DataFrame,
                group_by: Sequence[str]) -> None:
    """Where every finished run is shown, so the counts add up to the header's."""
    counts = shown_counts(runs, group_by)
    sections = len(groups_of(table, group_by))
    parts = [f"{counts['table']} in the claims tables below ({sections} "
             f"section{'s' if sections != 1 else ''})"]
    if counts["other"]:
        parts.append(f"{counts['other']} in other head x d settings (named below)")
    if counts["ufm"]:
        parts.append(f"{counts['ufm']} UFM runs (their own section)")
    text = f"Of the {counts['done']} finished runs: {', '.join(parts)}."
    if counts["repeated"]:
        text += (f" {counts['repeated']} of them fit more than one condition and are shown in "
                 "each (a learned-head baseline serves every ETF condition that differs only in "
                 "the ETF head's options).")
    doc.paragraph(text)


def _ufm_section(doc: Document, runs: pd.DataFrame, has_figure: bool) -> None:
    table = ufm_table(runs)
    if table.empty:
        return
    doc.heading(2, "UFM landscape: every critical point at d = K is a global minimum or a "
                   "strict saddle")
    closed = table[table["optimum_share"].notna()]
    n, reached = int(closed["n"].sum()), int(closed["n_optimum"].sum())
    flagged = int(table["n_spurious_suspect"].sum())
    at_k = closed[closed["feature_dim"] == closed["num_classes"]]
    bullets = [f"random starts that reached the global optimum: {reached}/{n} "
               f"({_share(reached / max(n, 1))})"]
    if not at_k.empty:
        k_n, k_reached = int(at_k["n"].sum()), int(at_k["n_optimum"].sum())
        bullets.append(f"at d = K: {k_reached}/{k_n} ({_share(k_reached / k_n)}) in "
                       f"{len(at_k)} (K, loss) cell(s)")
    below = table[table["optimum_share"].isna()]
    if not below.empty:
        b_n, b_best = int(below["n"].sum()), int(below["n_best"].sum())
        bullets.append(f"without a closed form (d < K-1): {b_best}/{b_n} starts "
                       f"({_share(b_best / b_n)}) at the best value their run found; "
                       f"up to {int(below['distinct_values_max'].max())} distinct final "
                       "values in one run")
    bullets.append(f"no spurious local minimum found: {'yes' if flagged == 0 else 'NO'} "
                   f"({flagged} suspect{'s' if flagged != 1 else ''}; "
                   f"{int(table['n_saddles'].sum())} start(s) above tolerance certified as "
                   "strict saddles: a vanishing gradient and negative curvature)")
    doc.bullets(bullets)
    doc.paragraph("n counts random starts (a run of `arch.starts=R` counts R, any other UFM "
                  "run one). at optimum: starts with f - f* <= probe_gap_tol against the "
                  "closed form (- where none covers the cell); at best: starts within it of "
                  "the best value found in their run; distinct: the most distinct final "
                  "objective values (1e-9 relative) of one run; Hessian: the smallest "
                  "eigenvalue probed at start 0 of each run; saddles / suspects: starts "
                  "above tolerance with a vanishing gradient and negative curvature / and "
                  "none (one above tolerance without a vanishing gradient has not "
                  "converged). The per-start record of a batched run is its `starts.jsonl`.")
    shown = table.rename(columns={"num_classes": "K", "feature_dim": "d", "d_over_k": "d/K",
                                  "n_optimum": "at optimum", "n_best": "at best",
                                  "distinct_values_max": "distinct",
                                  "hessian_min_eig_min": "Hessian min eig",
                                  "n_saddles": "saddles", "n_spurious_suspect": "suspects"})
    for column in ("gap_median", "gap_max", "Hessian min eig", "grad_norm_max"):
        shown[column] = shown[column].map(lambda v: "-" if missing(v) else f"{v:.3g}")
    shown["d/K"] = shown["d/K"].map(lambda v: f"{v:.3g}")
    shown["at optimum"] = [
        "-" if missing(share) else f"{int(count)} ({_share(share)})"
        for count, share in zip(shown["at optimum"], shown["optimum_share"], strict=True)]
    shown["at best"] = [f"{int(count)} ({_share(share)})"
                        for count, share in zip(shown["at best"], shown["best_share"],
                                                strict=True)]
    doc.table(shown.drop(columns=["optimum_share", "best_share", "reference"]), index=False)
    if has_figure:
        doc.image("ufm.png", "UFM share of starts at the optimum, distinct values and worst "
                             "gap against d/K")


def _share(fraction: float) -> str:
    """A share in percent to one decimal: 997 of 1000 is 99.7%, never rounded up to 100%."""
    return f"{math.floor(1000 * fraction + 1e-9) / 10:g}%"


def _apart_section(doc: Document, runs: pd.DataFrame) -> None:
    apart = not_averaged(runs)
    doc.heading(2, "Runs not averaged (failed, still running, dry runs, unreadable)")
    if apart.empty:
        doc.paragraph("None: every run finished.")
        return
    doc.table(apart[["status", "path", "reason"]], index=False)


def write_report(runs: pd.DataFrame, history: pd.DataFrame, out: str | os.PathLike,
                 group_by: Sequence[str] = DEFAULT_GROUP_BY,
                 sources: Sequence[str] = (),
                 tolerance_pts: float = TOLERANCE_PTS) -> list[Path]:
    """Write runs.csv, report.md, report.html and the figures into ``out``, all or nothing."""
    table = claims_table(runs, group_by)
    verdicts = claim_verdicts(table, group_by, tolerance_pts)
    made = make_figures(runs, history, table, group_by)
    doc = build_document(runs, table, verdicts, list(made), group_by, sources)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        runs.to_csv(staging / "runs.csv", index=False)
        (staging / "report.md").write_text(doc.to_markdown())
        (staging / "report.html").write_text(doc.to_html())
        for name, figure in made.items():
            save_png(figure, staging / name)
        return _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> list[Path]:
    names = sorted(p.name for p in staging.iterdir())
    if not out.exists():
        os.replace(staging, out)
    else:
        for name in names:
            os.replace(staging / name, out / name)
    return [out / name for name in names]
