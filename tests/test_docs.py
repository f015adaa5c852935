"""The docs ship with the code: every document the code or docs cite exists, README stays short.

Also the generated part of docs/benchmarks.md: ``benchmarks/run_all.py`` rewrites only it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITING = ("src", "tests", "benchmarks", "conf", "docs", "README.md", "Makefile")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ""}
# Files the report writes into its output folder: named in the code, not cited documents.
OUTPUT_NAMES = {"report.md"}
CITATION = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-][\w.-]*\.md|docs/[\w./-]*[\w-])\b")
MD_LINK = re.compile(r"\]\(([^)\s:]+?\.md)?(?:#([^)\s]+))?\)")
README_MAX_LINES = 200
TWO_COMMANDS = ["```bash", "make demo", "make test", "```"]


def citing_files() -> list[Path]:
    """The source, test, benchmark, config and documentation files that may cite a document."""
    files = []
    for name in CITING:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()
                      and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def resolves(cited: str, source: Path) -> bool:
    """A cited path exists from the repository root or from the citing file's folder."""
    return (ROOT / cited).exists() or (source.parent / cited).exists()


def test_every_cited_document_exists() -> None:
    missing = []
    for path in citing_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for cited in CITATION.findall(line):
                cited = cited.rstrip(".")
                if cited in OUTPUT_NAMES or resolves(cited, path):
                    continue
                missing.append(f"{path.relative_to(ROOT)}:{number}: {cited}")
    assert not missing, "cited documents missing from the repository:\n" + "\n".join(missing)


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    lines = document.read_text().splitlines()
    fenced, found = False, set()
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def test_markdown_links_reach_their_document_and_heading() -> None:
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, fragment in MD_LINK.findall(path.read_text()):
            document = (path.parent / target) if target else path
            if not document.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} does not exist")
            elif fragment and fragment not in anchors(document):
                broken.append(f"{path.relative_to(ROOT)}: no heading #{fragment} in {target}")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    body = [line for line in lines if line.strip() and not line.startswith("# ")]
    assert body[:len(TWO_COMMANDS)] == TWO_COMMANDS


def test_the_docs_cover_their_subjects() -> None:
    """The documents the README links exist, and docs/metrics.md names every key of ncsweep.nc."""
    from ncsweep.nc import COMPUTE_KEYS, HELDOUT_KEYS

    for name in ("metrics", "run-folder", "sweeps", "report", "benchmarks", "configuration"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
    metrics = (ROOT / "docs/metrics.md").read_text()
    absent = [k for k in (*COMPUTE_KEYS, *HELDOUT_KEYS) if f"`{k}`" not in metrics
              and not _named_by_pattern(k, metrics)]
    assert not absent, f"keys not defined in docs/metrics.md: {absent}"


def _named_by_pattern(key: str, text: str) -> bool:
    """``nc2_equinorm_w`` is named in a list like ``nc2_equinorm_w``, ``nc2_equinorm_m``."""
    return f"`{key}`" in text or any(f"`{key.rsplit('_', 1)[0]}_{s}`" in text for s in "wm")


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("run_all", None)


def test_bench_runner_rewrites_only_its_section(run_all, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(f"# Benchmarks\n\nkept by hand\n\n{run_all.BEGIN}\nold figures\n"
                   f"{run_all.END}\n\ntail kept\n")
    result = run_all.Result("python benchmarks/x.py", 0, 1.5, ["ratio a / b: 2.00x"])
    run_all.write(doc, run_all.section([result], "2026-01-01 00:00 UTC", "abc1234", "2 CPU"))
    text = doc.read_text()
    assert "kept by hand" in text and "tail kept" in text and "old figures" not in text
    for fact in ("2026-01-01 00:00 UTC", "abc1234", "2 CPU", "`python benchmarks/x.py`",
                 "ratio a / b: 2.00x"):
        assert fact in text
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


def test_bench_runner_runs_every_benchmark_but_itself(run_all) -> None:
    names = [p.name for p in run_all.benchmarks(ROOT / "benchmarks", [])]
    assert "run_all.py" not in names and "throughput.py" in names
    assert "GPU:" in run_all.machine() and run_all.commit()
