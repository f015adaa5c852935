"""Read ncsweep runs back and judge the Neural Collapse claims: tables, verdicts, figures.

``python -m ncsweep.report RUNS... [--out DIR] [--group-by KEYS] [--margin PTS] [--alpha A]``
writes runs.csv, verdicts.csv, report.md, report.html and PNG figures into DIR (default
``./report``). RUNS are run folders, sweep folders
(searched recursively), W&B ``offline-run-*`` folders or ``wandb://entity/project[?group=NAME]``.
The same steps are public functions for notebooks: :func:`load_runs`, :func:`load_history`,
:func:`claims_table`, :func:`verdict_table`, :func:`claim_verdicts`, :func:`ufm_table`, the
``*_figure`` functions, :func:`write_report` and :func:`sweep_answer` (the end of a sweep). The
modules are the seams: ``sources`` (reading runs, with ``rows``, ``wandb_log`` and
``wandb_project``), ``claims`` (the table), ``stats`` and ``verdicts`` (the tests), ``lines``
(their text), ``figures`` and ``forest``, ``document``, ``tables``, ``ufm`` and
``ufm_section``, ``write``, ``answer`` and ``__main__``.
Run folders are read only through :mod:`ncsweep.tracking`; only finished runs are averaged, and a
cell only over runs that differ in nothing but the seed (see :mod:`ncsweep.report.claims`).
"""

from ncsweep.report.answer import sweep_answer
from ncsweep.report.claims import (
    DEFAULT_GROUP_BY,
    claims_table,
    not_averaged,
    params_text,
    repeated_seeds,
    shown_counts,
)
from ncsweep.report.conditions import with_conditions
from ncsweep.report.figures import curves_figure, png_bytes, resources_figure, ufm_figure
from ncsweep.report.forest import forest_figure
from ncsweep.report.lines import claim_verdicts, short_lines
from ncsweep.report.rows import ReportError
from ncsweep.report.sources import load, load_history, load_runs
from ncsweep.report.tables import format_claims, format_rowspace
from ncsweep.report.ufm import ufm_suspects, ufm_table
from ncsweep.report.verdicts import verdict_table
from ncsweep.report.wandb_log import read_wandb_offline, wandb_offline_files
from ncsweep.report.write import groups_of, make_figures, section_title, write_report

__all__ = [
    "DEFAULT_GROUP_BY", "ReportError", "claim_verdicts", "claims_table", "curves_figure",
    "forest_figure", "format_claims", "format_rowspace", "groups_of", "load", "load_history",
    "load_runs", "make_figures", "not_averaged", "params_text", "png_bytes",
    "read_wandb_offline", "repeated_seeds", "resources_figure", "section_title", "short_lines",
    "shown_counts", "sweep_answer", "ufm_figure", "ufm_suspects", "ufm_table", "verdict_table",
    "wandb_offline_files", "with_conditions", "write_report",
]
