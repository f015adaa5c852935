"""Building the report (the document, runs.csv, figures) and publishing it all or nothing."""

from __future__ import annotations

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
    DEFAULT_GROUP_BY,
    claims_table,
    not_averaged,
    other_settings,
    repeated_seeds,
    row_keys,
    shown_counts,
)
from ncsweep.report.conditions import NONE
from ncsweep.report.depth import depth_figure, depth_runs, depth_section
from ncsweep.report.document import Document
from ncsweep.report.figures import curves_figure, resources_figure, save_png, ufm_figure
from ncsweep.report.forest import forest_figure
from ncsweep.report.lines import claim_verdicts
from ncsweep.report.tables import format_claims, format_rowspace
from ncsweep.report.ufm import ufm_suspects
from ncsweep.report.ufm_section import ufm_section
from ncsweep.report.verdicts import (
    ALPHA,
    ASSUMED_SD_PTS,
    FLOOR,
    MARGIN_PTS,
    RATIO_LIMIT,
    STABLE_BOUND,
    verdict_table,
)

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
                 group_by: Sequence[str], verdicts: pd.DataFrame | None = None
                 ) -> dict[str, Figure]:
    """Every figure of the report by file name: curves and resources per group, the forest plot
    of the verdicts, the UFM plot."""
    made: dict[str, Figure] = {}
    if verdicts is not None:
        forest = forest_figure(verdicts)
        if forest is not None:
            made["forest.png"] = forest
    for group in groups_of(table, group_by):
        name = slug(group)
        if not history.empty:
            made[f"curves-{name}.png"] = curves_figure(runs, history, group, group_by)
        made[f"resources-{name}.png"] = resources_figure(table, group)
        frame, blocks = depth_runs(runs, group, group_by)
        if blocks and not frame.empty:
            made[f"depth-{name}.png"] = depth_figure(frame, blocks, group)
    ufm = ufm_figure(runs)
    if ufm is not None:
        made["ufm.png"] = ufm
    return made


def build_document(runs: pd.DataFrame, table: pd.DataFrame, verdicts: pd.DataFrame,
                   figure_names: Sequence[str], group_by: Sequence[str],
                   sources: Sequence[str]) -> Document:
    """report.md / report.html content: counts, claims per group, UFM landscape, runs apart."""
    doc = Document("Neural Collapse sweep report")
    doc.paragraph(how_text())
    _overview(doc, runs, sources)
    _suspect_alarm(doc, runs)
    if not table.empty:
        _claims_section(doc, runs, table, verdicts, figure_names, group_by)
    ufm_section(doc, runs, "ufm.png" in figure_names)
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
                  "NC2 is `nc2_m` (class means against the simplex ETF); accuracies are in "
                  "percent, differences in points. Memory: the CUDA peak where both sides ran on "
                  "a GPU, else train_memory_bytes (parameters, gradients, optimizer state and "
                  "saved activations of one step).")
    doc.paragraph(rules_text(verdicts))
    if "forest.png" in figure_names:
        doc.image("forest.png", "accuracy differences and NC ratios with their intervals")
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
        frame, blocks = depth_runs(runs, group, group_by)
        figure = f"depth-{slug(group)}.png"
        depth_section(doc, frame, blocks, figure if figure in figure_names else None, title)


DOCS = Path(__file__).resolve().parents[3] / "docs" / "report.md"


def how_text() -> str:
    """The header's one sentence on how verdicts are made, linking the full rules."""
    target = DOCS.as_uri() if DOCS.exists() else "docs/report.md"
    return ("How verdicts are made: each claim is a test over the seeds of both sides (a "
            "confidence interval, not a difference of means), all tests of the report "
            "Holm-adjusted together, and a claim is `yes` or `no` only where its interval (and, "
            "for `yes`, its adjusted p-value) settles it, else `inconclusive` with the seeds "
            f"that would settle it; the full rules: [docs/report.md]({target}).")


def rules_text(verdicts: pd.DataFrame) -> str:
    """The verdict rules with this report's margin, alpha and the number of tests adjusted."""
    margin = verdicts.attrs.get("margin", MARGIN_PTS)
    alpha = verdicts.attrs.get("alpha", ALPHA)
    tests = verdicts.attrs.get("tests", 0)
    return (f"Verdicts ({1 - 2 * alpha:.0%} intervals, alpha {alpha:g} one-sided; "
            f"{tests} test{'s' if tests != 1 else ''} Holm-adjusted together; every number is in "
            "verdicts.csv). Accuracy: non-inferiority of the candidate's test accuracy at a "
            f"margin of {margin:g} points (paired t on shared seeds, else Welch): `yes` when the "
            f"interval of candidate - baseline lies above -{margin:g} and the adjusted p-value is "
            f"below {alpha:g}, `no` when it lies below -{margin:g}, else `inconclusive`; one "
            "seed a side is always inconclusive, its seeds to settle planned at an assumed sd "
            f"of {ASSUMED_SD_PTS:g} points a run. Collapse: each of nc1, nc2_m, nc3 (and the "
            "row-space keys of a frozen head) as the ratio candidate / baseline of geometric "
            f"means, passing when its upper bound is at most {RATIO_LIMIT:g} (and the adjusted "
            f"p is below {alpha:g}) or every candidate run is below {FLOOR:g}, failing when its "
            f"lower bound is above {RATIO_LIMIT:g}. Stability: `no` with any failed or diverged "
            "candidate run, `yes` when none did and the exact 95% bound on the failure rate is "
            f"below {STABLE_BOUND:.0%}.")


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


def _apart_section(doc: Document, runs: pd.DataFrame) -> None:
    apart = not_averaged(runs)
    doc.heading(2, "Runs not averaged (failed, still running, dry runs, unreadable)")
    if apart.empty:
        doc.paragraph("None: every run finished.")
        return
    doc.table(apart[["status", "path", "reason"]], index=False)


def write_report(runs: pd.DataFrame, history: pd.DataFrame, out: str | os.PathLike,
                 group_by: Sequence[str] = DEFAULT_GROUP_BY,
                 sources: Sequence[str] = (), margin_pts: float = MARGIN_PTS,
                 alpha: float = ALPHA) -> list[Path]:
    """Write runs.csv, verdicts.csv, report.md, report.html and the figures into ``out``, all or
    nothing."""
    table = claims_table(runs, group_by)
    tested = verdict_table(table, group_by, margin_pts, alpha)
    verdicts = claim_verdicts(table, group_by, margin_pts, alpha, tested)
    verdicts.attrs.update(tested.attrs)
    made = make_figures(runs, history, table, group_by, tested)
    doc = build_document(runs, table, verdicts, list(made), group_by, sources)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        runs.to_csv(staging / "runs.csv", index=False)
        tested.to_csv(staging / "verdicts.csv", index=False)
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
