"""Read ncsweep runs back and judge the Neural Collapse claims: tables, verdicts, figures.

``python -m ncsweep.report RUNS... [--out DIR] [--group-by KEYS]`` writes runs.csv, report.md,
report.html and PNG figures into DIR (default ``./report``). RUNS are run folders, sweep folders
(searched recursively), W&B ``offline-run-*`` folders or ``wandb://entity/project[?group=NAME]``.
The same steps are public functions for notebooks: :func:`load_runs`, :func:`load_history`,
:func:`claims_table`, :func:`claim_verdicts`, :func:`ufm_table`, the ``*_figure`` functions and
:func:`write_report`. The modules are the seams: ``sources`` (reading runs, with ``wandb_log``
and ``wandb_project``), ``claims``, ``figures``, ``document``, ``write`` and ``__main__``.
Run folders are read only through :mod:`ncsweep.tracking`; only finished runs are averaged.
"""

from ncsweep.report.claims import (
    DEFAULT_GROUP_BY,
    claim_verdicts,
    claims_table,
    collapsed_as_far,
    mixed_cells,
    not_averaged,
    ufm_suspects,
    ufm_table,
)
from ncsweep.report.figures import curves_figure, png_bytes, resources_figure, ufm_figure
from ncsweep.report.sources import ReportError, load, load_history, load_runs
from ncsweep.report.wandb_log import read_wandb_offline, wandb_offline_files
from ncsweep.report.write import (
    format_claims,
    format_rowspace,
    groups_of,
    make_figures,
    write_report,
)

__all__ = [
    "DEFAULT_GROUP_BY", "ReportError", "claim_verdicts", "claims_table", "collapsed_as_far",
    "curves_figure", "format_claims", "format_rowspace", "groups_of", "load", "load_history",
    "load_runs", "make_figures", "mixed_cells", "not_averaged", "png_bytes",
    "read_wandb_offline", "resources_figure", "ufm_figure", "ufm_suspects", "ufm_table",
    "wandb_offline_files", "write_report",
]
