"""The answer at the end of a sweep: the report written into the sweep folder, verdict lines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from ncsweep.report.claims import BASELINE, CANDIDATE, claims_table, setting_name
from ncsweep.report.lines import short_lines
from ncsweep.report.rows import ReportError
from ncsweep.report.sources import load
from ncsweep.report.verdicts import ALPHA, MARGIN_PTS, read_verdicts
from ncsweep.report.write import write_report

logger = logging.getLogger(__name__)
REPORT_DIR = "report"


def sweep_answer(sweep_dir: str | os.PathLike, margin: float = MARGIN_PTS,
                 alpha: float = ALPHA) -> list[str]:
    """Write the report into ``<sweep_dir>/report`` and return its verdict lines, one a claim,
    then where it was written; empty where no condition has both a finished baseline and a
    finished candidate (nothing to answer) or the folder holds no runs."""
    sweep = Path(sweep_dir)
    try:
        runs, history = load(sweep)
    except ReportError as err:
        logger.info("no report for %s: %s", sweep, err)
        return []
    if not has_pair(claims_table(runs)):
        return []
    out = sweep / REPORT_DIR
    write_report(runs, history, out, sources=[str(sweep)], margin_pts=margin, alpha=alpha)
    lines = short_lines(read_verdicts(out / "verdicts.csv"), alpha)
    return [*lines, f"report written to {out / 'report.md'}"]


def has_pair(table: pd.DataFrame) -> bool:
    """Whether some condition has finished runs of both the baseline and the candidate."""
    if table.empty:
        return False
    done = table[table["n_done"] > 0]
    keys = [c for c in table.columns[:table.columns.get_loc("setting")]]
    settings = done.groupby(keys, sort=False)["setting"].agg(set)
    wanted = {setting_name(*BASELINE), setting_name(*CANDIDATE)}
    return any(wanted <= found for found in settings)
