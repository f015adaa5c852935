"""``python -m ncsweep.report RUNS... [--out DIR] [--group-by KEYS] [--margin PTS] [--alpha A]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import matplotlib

from ncsweep.report.claims import DEFAULT_GROUP_BY
from ncsweep.report.rows import ReportError
from ncsweep.report.sources import load
from ncsweep.report.verdicts import ALPHA, MARGIN_PTS
from ncsweep.report.write import write_report

PROG = "python -m ncsweep.report"


def parser() -> argparse.ArgumentParser:
    """The command line: sources, output folder, grouping, the accuracy margin and alpha."""
    cli = argparse.ArgumentParser(
        prog=PROG, description="Tables, verdicts and figures from ncsweep runs.")
    cli.add_argument("runs", nargs="+", metavar="RUNS",
                     help="run folders, sweep folders (searched recursively), W&B offline-run "
                          "folders, or wandb://entity/project[?group=NAME]")
    cli.add_argument("--out", default="report", help="output folder (default: ./report)")
    cli.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY), metavar="KEYS",
                     help="comma-separated run columns that make a row of the claims table "
                          "(default: %(default)s)")
    cli.add_argument("--margin", type=float, default=MARGIN_PTS, metavar="PTS",
                     help="non-inferiority margin: test-accuracy points ETF + d=K may lose to "
                          "the baseline (default: %(default)s)")
    cli.add_argument("--alpha", type=float, default=ALPHA, metavar="A",
                     help="one-sided level of every test, Holm-adjusted over the report; "
                          "intervals are 1 - 2 alpha (default: %(default)s)")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Load the runs, write the report, print where; bad input is one line on stderr."""
    args = parser().parse_args(argv)
    matplotlib.use("Agg")
    logging.basicConfig(format="ncsweep.report: %(levelname)s: %(message)s")
    try:
        group_by = _group_by(args.group_by)
        _check(args.margin, args.alpha)
        runs, history = load(args.runs)
        unknown = [k for k in group_by if k not in runs.columns]
        if unknown:
            raise ReportError(f"--group-by {','.join(unknown)}: not a run column (try "
                              f"{', '.join(DEFAULT_GROUP_BY)}, optim, embedding, name, seed)")
        written = write_report(runs, history, args.out, group_by, args.runs, args.margin,
                               args.alpha)
    except ReportError as err:
        print(f"ncsweep.report: error: {err}", file=sys.stderr)
        return 1
    counts = runs["status"].value_counts().to_dict()
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    report = next(p for p in written if p.name == "report.md")
    print(f"ncsweep.report: {len(runs)} runs ({summary}); {len(written)} files: {report}")
    return 0


def _check(margin: float, alpha: float) -> None:
    if not margin >= 0:
        raise ReportError(f"--margin {margin:g}: not allowed, a number of points >= 0")
    if not 0 < alpha < 0.5:
        raise ReportError(f"--alpha {alpha:g}: not allowed, a number in (0, 0.5)")


def _group_by(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ReportError("--group-by needs at least one column, e.g. dataset,arch,loss")
    return keys


if __name__ == "__main__":
    sys.exit(main())
