"""The report against real runs of the CLI: values, failures kept apart, verdicts, figures, CLI.

One module-scoped fixture runs two tiny real sweeps side by side: a head x dim x seed grid on the
digits whose (etf, d=K-2) jobs fail, and a UFM sweep mirrored to offline W&B runs. Aggregates and
verdicts are also checked on a table built by hand, where every number is known.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from ncsweep.report import (
    claim_verdicts,
    claims_table,
    format_claims,
    load,
    load_history,
    load_runs,
    not_averaged,
    repeated_seeds,
    ufm_table,
    write_report,
)
from ncsweep.report.__main__ import main
from ncsweep.report.wandb_log import HEADER, read_wandb_offline, wandb_offline_files
from ncsweep.tracking import RunFolder
from tests.support import ROOT, exits_within, returns_within, run_cli

TINY = ["trainer.epochs=2", "trainer.eval_every=1", "arch.width=32", "trainer.progress=false"]
VARIANT = ["-m", "head=etf,learned", "dim=K,512", "dataset.test_fraction=0.3", *TINY,
           "logger=none", "name=variant"]
SWEEPS = {
    "card": ["-m", "head=etf,learned", "dim=K,512,K-2", "seed=0,1", *TINY, "logger=none",
             "name=card"],
    "ufm": ["-m", "experiment=ufm", "dataset.num_classes=4", "dataset.n_per_class=5",
            "trainer.epochs=5", "seed=0,1", "trainer.progress=false"],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report_cli(args: list[str], cwd: Path, env: dict | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``python -m ncsweep.report`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ncsweep.report", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "WANDB_ERROR_REPORTING": "false", **(env or {})})


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The card, ufm and variant sweeps, all at once: (root, CompletedProcess) each."""
    roots = {"card": tmp_path_factory.mktemp("report")}
    roots["ufm"], roots["variant"] = roots["card"], tmp_path_factory.mktemp("variant")
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    jobs = {**{name: (args, offline) for name, args in SWEEPS.items()},
            "variant": (VARIANT, {"OMP_NUM_THREADS": "1"})}
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = pool.map(lambda name: run_cli(jobs[name][0], roots[name], env=jobs[name][1]), jobs)
        return {name: (roots[name], result) for name, result in zip(jobs, done, strict=True)}


@pytest.fixture(scope="module")
def sweeps(cli_runs: dict) -> Path:
    """Real sweeps under ``<root>/multirun``: card (10 done, 2 failed) and ufm (2, with W&B)."""
    (root, card), (_, ufm) = cli_runs["card"], cli_runs["ufm"]
    assert card.returncode == 1 and "10 done, 2 failed" in card.stdout, card.stdout + card.stderr
    assert ufm.returncode == 0, ufm.stderr
    return root / "multirun"


@pytest.fixture(scope="module")
def variant_sweep(cli_runs: dict) -> Path:
    """A real sweep of the card grid (seed 0) on another test split: a data variant."""
    root, result = cli_runs["variant"]
    assert result.returncode == 0 and "4 done" in result.stdout, result.stdout + result.stderr
    return root / "multirun" / "variant"


@pytest.fixture(scope="module")
def cli_report(sweeps: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The CLI run once over both sweeps."""
    out = sweeps.parent / "report-all"
    return report_cli([str(sweeps), "--out", str(out)], sweeps.parent), out


def folders(sweep: Path, status: str = "done") -> list[RunFolder]:
    return [RunFolder(p) for p in sorted(sweep.iterdir()) if RunFolder(p).status == status]


def etf_embedding(sweeps: Path) -> str:
    """The embedding the card sweep's ETF heads used, as their run.json says."""
    [folder] = [f for f in folders(sweeps / "card") if "dim=K,head=etf,seed=0" in f.path.name]
    return folder.read_run()["embedding"]


def test_rows_equal_what_the_runs_wrote(sweeps: Path) -> None:
    runs = load_runs(sweeps / "card").set_index("path")
    assert len(runs) == 12 and sorted(runs["status"].value_counts().items()) == [
        ("done", 10), ("failed", 2)]
    runs = runs[runs["status"] == "done"]
    for folder in folders(sweeps / "card"):
        row, summary = runs.loc[str(folder.path.resolve())], folder.read_summary()
        for key, value in summary.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-12), key
            elif isinstance(value, (int, str, bool)):
                assert row[key] == value, key
        assert row["run_key"] == folder.path.name and row["name"] == "card"
    assert set(zip(runs["head"], runs["feature_dim"], runs["seed"], strict=True)) == {
        (h, d, s) for h in ("etf", "learned") for d in (10, 512) for s in (0, 1)} | {
        ("learned", 8, 0), ("learned", 8, 1)}


def test_history_rows_equal_metrics_jsonl(sweeps: Path) -> None:
    history = load_history(sweeps / "card")
    for folder in folders(sweeps / "card"):
        mine = history[history["path"] == str(folder.path.resolve())]
        rows = folder.read_metrics()
        assert list(mine["epoch"]) == [r["epoch"] for r in rows] == [0, 1, 2]
        for key in ("nc1", "nc2_m", "nc3", "nc4", "train_acc", "test_acc", "step"):
            assert list(mine[key]) == pytest.approx([r[key] for r in rows], rel=1e-12)
        assert set(mine["head"]) == {folder.read_summary()["head"]}


def test_failed_and_running_runs_are_listed_apart_never_averaged(sweeps: Path,
                                                                 tmp_path: Path) -> None:
    card = load_runs(sweeps / "card")
    failed = card[card["status"] == "failed"]
    bad = folders(sweeps / "card", "failed")
    assert sorted(failed["reason"]) == sorted(f.failure() for f in bad) and len(bad) == 2
    assert all("dim='K-2' is not allowed" in reason for reason in failed["reason"])
    assert set(zip(failed["head"], failed["dim"], failed["seed"], strict=True)) == {
        ("etf", "K-2", 0), ("etf", "K-2", 1)}
    assert sorted(not_averaged(card)["path"]) == sorted(str(f.path.resolve()) for f in bad)
    extra = tmp_path / "extra"
    sources = {name: next(p for p in (sweeps / "card").iterdir()
                          if f"dim={d},head=etf,seed=0" in p.name)
               for name, d in (("crashed", "K"), ("killed", "K"), ("dry", "512"))}
    for name, source in sources.items():
        shutil.copytree(source, extra / name)
    RunFolder(extra / "crashed").mark_failed(RuntimeError("boom"))
    killed = RunFolder(extra / "killed")
    killed.file("DONE").unlink()
    killed.write_summary({**killed.read_summary(), "test_acc": 0.0, "train_acc": 0.0})
    dry = RunFolder(extra / "dry")
    dry.reset()
    dry.write_summary({**RunFolder(sources["dry"]).read_summary(), "status": "dry_run"})
    runs = load_runs([sweeps / "card", extra])
    status = runs.set_index(runs["path"].map(lambda p: Path(p).name))["status"]
    assert status[["crashed", "killed", "dry"]].tolist() == ["failed", "running", "dry_run"]
    apart = not_averaged(load_runs(extra))
    assert sorted(apart["status"]) == ["dry_run", "failed", "running"]
    assert apart.set_index("status").loc["failed", "reason"] == "RuntimeError: boom"
    assert "no DONE or FAILED marker" in apart.set_index("status").loc["running", "reason"]
    alone = claims_table(load_runs(sweeps / "card")).set_index("setting")
    mixed = claims_table(runs).set_index("setting")
    cell = mixed.loc["etf, d=K"]
    assert (cell["n_done"], cell["n_failed"], cell["n_running"]) == (2, 1, 1)
    assert cell["test_acc_mean"] == alone.loc["etf, d=K", "test_acc_mean"]
    assert mixed.loc["etf, d=large", "n_done"] == 2
    assert alone["n_done"].tolist() == [2, 2, 2, 2] and alone["n_failed"].sum() == 0


def hand_runs() -> pd.DataFrame:
    """Known finals: 3 seeds per setting, one failed ETF run, no (etf, 512) in the mse group."""
    rows = []
    accs = {("learned", 512): (0.90, 0.92, 0.94), ("learned", 10): (0.80, 0.82, 0.84),
            ("etf", 512): (0.91, 0.93, 0.95), ("etf", 10): (0.89, 0.92, 0.92)}
    params = {("learned", 512): 11_181_642, ("learned", 10): 8_867_642,
              ("etf", 512): 11_176_522, ("etf", 10): 8_867_542}
    memory = {("learned", 512): 1000, ("learned", 10): 900, ("etf", 512): 990, ("etf", 10): 800}
    for loss in ("ce", "mse"):
        for (head, dim), values in accs.items():
            if loss == "mse" and (head, dim) == ("etf", 512):
                continue
            for seed, acc in enumerate(values):
                rows.append({
                    "dataset": "cifar10", "arch": "resnet18", "loss": loss, "head": head,
                    "feature_dim": dim, "num_classes": 10, "seed": seed, "status": "done",
                    "test_acc": acc, "train_acc": 1.0, "nc1": 10.0 ** -seed, "nc2_m": 0.1,
                    "nc3": 0.2, "nc4": 0.0, "params_trainable": params[(head, dim)],
                    "params_total": params[(head, dim)] + (10 * dim if head == "etf" else 0),
                    "peak_memory_bytes": memory[(head, dim)] * 2**20,
                    "peak_memory_kind": "cuda_max_allocated", "diverged": False,
                    "epochs_to_full_train_acc": 40 + seed, "path": f"{loss}/{head}/{dim}/{seed}"})
    rows.append({**rows[-1], "seed": 3, "status": "failed", "test_acc": 0.0, "path": "x/failed",
                 "diverged": True, "epochs_to_full_train_acc": None})
    return pd.DataFrame(rows)


def test_claims_table_aggregates_and_verdicts_on_known_input() -> None:
    table = claims_table(hand_runs())
    ce = table[table["loss"] == "ce"].set_index("setting")
    etf = ce.loc["etf, d=K"]
    assert list(ce.index) == ["learned, d=large", "learned, d=K", "etf, d=large", "etf, d=K"]
    assert (etf["n_done"], etf["n_failed"], etf["n_diverged"], etf["seeds"]) == (3, 0, 0, "0,1,2")
    assert etf["test_acc_mean"] == pytest.approx(0.91)
    assert etf["test_acc_std"] == pytest.approx(pd.Series([0.89, 0.92, 0.92]).std())
    assert etf["test_acc_delta_pts"] == pytest.approx(-1.0)
    assert etf["params_trainable_saved_pct"] == pytest.approx(20.696, abs=1e-3)
    assert etf["peak_memory_bytes_saved_pct"] == pytest.approx(20.0)
    assert etf["epochs_to_full_train_acc_mean"] == pytest.approx(41.0)
    mse = table[table["loss"] == "mse"].set_index("setting")
    assert mse.loc["etf, d=K", "n_failed"] == 1 and mse.loc["etf, d=K", "n_diverged"] == 1
    assert mse.loc["etf, d=K", "test_acc_mean"] == pytest.approx(0.91)
    assert mse.loc["etf, d=large", "n_done"] == 0
    assert format_claims(table, {"dataset": "cifar10", "arch": "resnet18", "loss": "mse"}).loc[
        "finished runs (seeds)", "etf, d=512"] == "missing (no finished runs)"
    verdicts = claim_verdicts(table).set_index(["loss", "claim"])
    assert verdicts.loc[("ce", "accuracy"), "verdict"] == "inconclusive"  # 3 seeds: -1 ± 1.69
    assert verdicts.loc[("ce", "accuracy"), "text"].startswith(
        "ETF + d=K within 0.5 points of baseline test accuracy (or above it): inconclusive "
        "(91.00% vs 92.00%, -1.00 pts; 90% CI -2.69 to +0.69, Holm-adjusted p 1; 3 seeds each, "
        "paired t; the 90% interval straddles -0.5); about 27 seeds a side would settle it")
    held = claim_verdicts(table, margin_pts=3.0).set_index(["loss", "claim"])
    assert held.loc[("ce", "accuracy"), "verdict"] == "inconclusive"
    assert ("the 90% interval clears -3, but its Holm-adjusted p 0.0742 (over 8 tests) is not "
            "below 0.05") in held.loc[("ce", "accuracy"), "text"]
    lenient = claim_verdicts(table, margin_pts=5.0).set_index(["loss", "claim"])
    assert lenient.loc[("ce", "accuracy"), "verdict"] == "yes"
    assert verdicts.loc[("ce", "parameters"), "verdict"] == "20.7%"
    assert "20.7% of trainable parameters" in verdicts.loc[("ce", "parameters"), "text"]
    assert verdicts.loc[("ce", "memory"), "text"].startswith(
        "peak memory saved by ETF + d=K: 20.0% (cuda_max_allocated")
    assert verdicts.loc[("mse", "stability"), "verdict"] == "no"
    assert "failed or diverged runs 1 vs 0" in verdicts.loc[("mse", "stability"), "text"]
    assert "epochs to 100% train accuracy 41 (3/3 runs)" in verdicts.loc[
        ("ce", "stability"), "text"]


def test_missing_baseline_and_mixed_memory_kinds_are_said_not_crashed() -> None:
    runs = hand_runs()
    no_base = runs[~((runs["head"] == "learned") & (runs["feature_dim"] == 512))]
    verdicts = claim_verdicts(claims_table(no_base))
    assert set(verdicts["verdict"]) == {"n/a"}
    assert "no finished runs for learned, d=large" in verdicts["text"].iloc[0]
    runs.loc[runs["head"] == "etf", "peak_memory_kind"] = "cpu_peak_rss"
    memory = claim_verdicts(claims_table(runs)).set_index(["loss", "claim"])
    assert memory.loc[("ce", "memory"), "verdict"] == "n/a"
    assert "not comparable" in memory.loc[("ce", "memory"), "text"]


def test_ufm_runs_table_and_loud_suspects(sweeps: Path, tmp_path: Path) -> None:
    runs, history = load(sweeps / "ufm")
    table = ufm_table(runs)
    assert table[["num_classes", "feature_dim", "loss", "n", "n_optimum"]].values.tolist() == [
        [4, 4, "ce", 2, 2]]
    assert table["gap_max"].iloc[0] == pytest.approx(runs["objective_gap"].max())
    runs.loc[0, ["spurious_minimum_suspect", "reached_global_optimum"]] = [True, False]
    write_report(runs, history, tmp_path / "out", sources=["hand-edited"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**WARNING:** **1 UFM run(s) flagged spurious_minimum_suspect**" in text
    assert runs.loc[0, "path"] in text and "no spurious local minimum found: NO" in text
    assert "1/2 (50%)" in text
    assert (tmp_path / "out" / "ufm.png").read_bytes().startswith(PNG_MAGIC)


def test_offline_wandb_reader_returns_the_run_folders_metrics(sweeps: Path) -> None:
    for folder in folders(sweeps / "ufm"):
        offline = wandb_offline_files(folder.path)[0].parent
        mine, my_history = load(folder.path)
        theirs, their_history = load(offline)
        assert theirs["source"].tolist() == ["wandb_offline"]
        assert mine["status"].tolist() == ["done"]
        for key in ("status", "dataset", "arch", "loss", "head", "feature_dim", "num_classes",
                    "seed", "optim", "dim", "name", "run_key", "params_trainable",
                    "reached_global_optimum", "spurious_minimum_suspect", "last_epoch"):
            assert theirs[key].iloc[0] == mine[key].iloc[0], key
        for key in ("train_acc", "nc1", "nc2_m", "nc3", "nc4", "objective", "objective_gap",
                    "hessian_min_eig", "grad_norm", "wall_time_s"):
            assert theirs[key].iloc[0] == pytest.approx(mine[key].iloc[0], rel=1e-12), key
        assert list(their_history["epoch"]) == list(my_history["epoch"]) == [0, 5]
        for key in ("nc1", "nc3", "train_acc", "objective_gap"):
            assert list(their_history[key]) == pytest.approx(list(my_history[key]), rel=1e-12)


def test_cli_writes_report_files_and_figures(cli_report: tuple, sweeps: Path) -> None:
    result, out = cli_report
    assert result.returncode == 0, result.stderr
    assert "14 runs (12 done, 2 failed)" in result.stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["curves-digits-mlp-ce.png", "depth-digits-mlp-ce.png", "forest.png",
                    "resources-digits-mlp-ce.png", "ufm.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1024, name
    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == 14 and sorted(csv["status"].value_counts().items()) == [
        ("done", 12), ("failed", 2)]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    label = f"ETF ({etf_embedding(sweeps)}) + d=K"
    assert f"{label} within 0.5 points of baseline test accuracy" in md
    assert f"memory saved by {label}: " in md and "(cpu_peak_rss" in md
    apart = md.split("## Runs not averaged")[1]
    for failed in folders(sweeps / "card", "failed"):
        assert str(failed.path.resolve()) in apart
    assert "dim='K-2' is not allowed" in apart
    assert "other settings, not in the table: learned, d=8" in md
    assert "UFM landscape" in md and "![" in md
    assert page.startswith("<!doctype html>") and "<table" in page and 'src="ufm.png"' in page
    assert "within 0.5 points" in page


def test_group_by_name_separates_sweeps_that_the_default_grouping_averages(
        sweeps: Path, capsys: pytest.CaptureFixture) -> None:
    runs = hand_runs()
    runs["name"] = ["first" if s % 2 else "second" for s in runs["seed"]]
    together = claims_table(runs).set_index(["loss", "setting"])
    assert set(together["condition"]) == {"none"}
    assert together.loc[("ce", "etf, d=K"), "n_done"] == 3
    twice = pd.concat([runs, runs.assign(path=runs["path"] + "/again")])
    assert repeated_seeds(runs) == []
    assert any("a seed appears more than once in" in n for n in repeated_seeds(twice))
    keys = ["name", "dataset", "arch", "loss"]
    table = claims_table(runs, keys)
    assert sorted(set(table["name"])) == ["first", "second"]
    assert table.set_index(["name", "loss", "setting"]).loc[
        ("first", "ce", "etf, d=K"), "n_done"] == 1
    assert main([str(sweeps / "card"), "--group-by", "dataset,nope"]) == 1
    assert capsys.readouterr().err.strip() == (
        "ncsweep.report: error: --group-by nope: not a run column (try dataset, arch, loss, "
        "optim, embedding, name, seed)")


@pytest.mark.parametrize("make_args,message", [
    (lambda tmp: [str(tmp / "nope")], "no such file or folder: "),
    (lambda tmp: [str(tmp)], "no runs under "),
    (lambda tmp: ["wandb://x/y"], "W&B server http://127.0.0.1:9 is not reachable"),
    (lambda tmp: ["wandb://x"], "bad W&B source 'wandb://x'"),
])
def test_cli_bad_input_fails_fast_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, make_args,
                                                message: str) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    (tmp_path / "empty").mkdir()
    args = [*make_args(tmp_path / "empty"), "--out", str(tmp_path / "out")]
    code = returns_within(60, lambda: main(args), f"ncsweep.report {args[0]} hung")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("ncsweep.report: error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_wandb_default_server_unreachable_fails_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_BASE_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "ncsweep.report", "wandb://x/y"], cwd=tmp_path,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, stderr = exits_within(proc, 60, "ncsweep.report wandb://x/y retried the default server")
    if proc.returncode == 0:
        pytest.skip("a W&B server answered for wandb://x/y")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("ncsweep.report: error: ")
    assert not (tmp_path / "report").exists()


def test_notebook_runs_headless_against_the_sweep(sweeps: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "notebooks" / "report.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")
    os.environ["NCSWEEP_REPORT_RUNS"] = str(sweeps)
    try:
        nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}
                                ).execute()
    finally:
        del os.environ["NCSWEEP_REPORT_RUNS"]
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert f"ETF ({etf_embedding(sweeps)}) + d=K within 0.5 points" in text


def wandb_file(sweeps: Path) -> Path:
    return wandb_offline_files(folders(sweeps / "ufm")[0].path)[0]


def history_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of every one-fragment history record of an intact W&B log."""
    from wandb.proto import wandb_internal_pb2

    found, pos = [], HEADER
    while pos + HEADER <= len(data):
        if 32768 - pos % 32768 < HEADER:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload = data[pos + HEADER:pos + HEADER + length]
        if kind == 1 and wandb_internal_pb2.Record.FromString(payload).HasField("history"):
            found.append((pos, length))
        pos += HEADER + length
    return found


def test_corrupt_wandb_record_is_skipped_with_its_offset(sweeps: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    source = wandb_file(sweeps)
    intact = read_wandb_offline(source.parent)
    data = bytearray(source.read_bytes())
    target = history_offsets(bytes(data))[0][0]
    data[target + HEADER + 3] ^= 0x40
    broken = tmp_path / "offline-run-x" / source.name
    broken.parent.mkdir()
    broken.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ncsweep.report.wandb_log"):
        read = read_wandb_offline(broken.parent)
    assert [r.getMessage() for r in caplog.records] == [
        f"{broken}: corrupt record at byte {target} (checksum mismatch); skipped"]
    assert read["config"] == intact["config"] and read["summary"] == intact["summary"]
    assert read["exit_code"] == intact["exit_code"] == 0
    assert len(read["history"]) == len(intact["history"]) - 1
    assert all(row in intact["history"] for row in read["history"])


def test_truncated_wandb_log_keeps_the_records_before_the_tear(
        sweeps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = wandb_file(sweeps)
    data = source.read_bytes()
    last_history = history_offsets(data)[-1][0]
    cut = last_history + HEADER + 5
    torn = tmp_path / "offline-run-y" / source.name
    torn.parent.mkdir()
    torn.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="ncsweep.report.wandb_log"):
        read = read_wandb_offline(torn.parent)
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{torn}: torn record at byte {last_history} ")
    intact = read_wandb_offline(source.parent)
    assert read["history"] == intact["history"][:len(read["history"])]
    assert read["config"]["feature_dim"] == intact["config"]["feature_dim"]
    assert read["exit_code"] is None


def write_folder(path: Path, head: str, dim: int, seed: int, finals: dict,
                 embedding: str | None = None, recorded: dict | None = None) -> None:
    """A run folder written with plain json and open(): the documented layout, nothing else."""
    path.mkdir(parents=True)
    identity = {"format": "ncsweep-run-1", "name": "hand", "run_key": path.name,
                "dataset": "digits", "arch": "mlp", "head": head, "loss": "ce", "optim": "sgd",
                "schedule": "none", "launcher": "basic", "experiment": None,
                "overrides": path.name.split(","), "dim": "K" if dim == 10 else str(dim),
                "feature_dim": dim, "num_classes": 10, "seed": seed,
                "embedding": embedding if head == "etf" else None, "code_commit": None,
                "code_dirty": None, "created": 1.7e9}
    (path / "run.json").write_text(json.dumps(identity))
    (path / "config.json").write_text(json.dumps({"seed": seed, "feature_dim": dim}))
    rows = [{"epoch": e, "step": 10 * e, "train_acc": 0.5 + e / 4, "test_acc": 0.5 + e / 5,
             "train_loss": 1.0 / (e + 1), **finals} for e in (0, 1, 2)]
    with open(path / "metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    summary = {**identity, "status": "done", **rows[-1], "params_trainable": 100 * dim,
               "params_total": 110 * dim, "peak_memory_bytes": 2**30,
               "peak_memory_kind": "cpu_peak_rss", "train_memory_bytes": 1000 * dim,
               **(recorded or {})}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "DONE").write_text("")


BASE_FINALS = {"nc1": 0.2, "nc2_m": 0.125, "nc3": 0.119, "nc4": 0.0}


def hand_sweep(root: Path, etf_finals: dict, base_finals: dict = BASE_FINALS) -> Path:
    """learned/etf x d=K/512 x seeds 0,1 written by hand; ETF d=K runs end at etf_finals."""
    for head in ("learned", "etf"):
        for dim in (10, 512):
            for seed in (0, 1):
                finals = etf_finals if (head, dim) == ("etf", 10) else base_finals
                write_folder(root / f"dim={dim},head={head},seed={seed}", head, dim, seed,
                             finals, embedding="coordinate")
    return root


def test_a_hand_written_run_folder_is_read_by_its_layout(tmp_path: Path) -> None:
    write_folder(tmp_path / "runs" / "dim=K,head=etf,seed=3", "etf", 10, 3,
                 {"nc1": 0.01, "nc2_m": 0.02, "nc3": 0.03, "nc4": 0.0}, embedding="coordinate")
    runs, history = load(tmp_path / "runs")
    row = runs.iloc[0]
    assert (row["status"], row["head"], row["embedding"], row["optim"], row["dim"],
            row["feature_dim"], row["seed"], row["name"]) == (
        "done", "etf", "coordinate", "sgd", "K", 10, 3, "hand")
    assert row["test_acc"] == pytest.approx(0.9) and row["train_memory_bytes"] == 10_000
    assert list(history["epoch"]) == [0, 1, 2] and list(history["nc2_m"]) == [0.02] * 3
    hand_sweep(tmp_path / "sweep", BASE_FINALS)
    code = main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert code == 0 and "| finished runs (seeds) | 2 (0,1) | 2 (0,1) | 2 (0,1) | 2 (0,1) |" in md
    assert "ETF (coordinate) + d=K within 0.5 points" in md
    assert "training-step memory saved by ETF (coordinate) + d=K: 98.0%" in md
    assert list(pd.read_csv(tmp_path / "out" / "runs.csv")["optim"]) == ["sgd"] * 8


def test_folders_without_run_json_are_listed_apart(tmp_path: Path) -> None:
    hand_sweep(tmp_path / "sweep", BASE_FINALS)
    old = tmp_path / "sweep" / "dim=512,head=learned,seed=0"
    (old / "run.json").unlink()
    crashed = tmp_path / "sweep" / "dim=K-2,head=etf,seed=0"
    write_folder(crashed, "etf", 8, 0, BASE_FINALS, embedding="random")
    for name in ("summary.json", "metrics.jsonl", "DONE"):
        (crashed / name).unlink()
    (crashed / "FAILED").write_text("ConfigError: dim='K-2' is not allowed\n")
    runs = load_runs(tmp_path / "sweep").set_index("run_key", drop=False)
    apart = not_averaged(runs).set_index("path")
    assert apart.loc[str(old.resolve()), "status"] == "unreadable"
    assert "no run.json" in apart.loc[str(old.resolve()), "reason"]
    failed = runs.loc["dim=K-2,head=etf,seed=0"]
    assert (failed["status"], failed["head"], failed["feature_dim"], failed["embedding"]) == (
        "failed", "etf", 8, "random")
    assert failed["reason"] == "ConfigError: dim='K-2' is not allowed"


def collapse(root: Path, etf_finals: dict, base_finals: dict = BASE_FINALS) -> pd.Series:
    verdicts = claim_verdicts(claims_table(load_runs(hand_sweep(root, etf_finals, base_finals))))
    return verdicts.set_index("claim").loc["collapse"]


def test_collapse_verdict_names_every_failing_metric(tmp_path: Path) -> None:
    worse = collapse(tmp_path / "worse", {"nc1": 0.01, "nc2_m": 0.511, "nc3": 0.557, "nc4": 0.0})
    assert worse["verdict"] == "no"
    assert ": no: nc2_m 0.511 vs 0.125, nc3 0.557 vs 0.119 (" in worse["text"]
    assert worse["text"].startswith("ETF (coordinate) + d=K collapses at least as far")
    better = collapse(tmp_path / "better", {"nc1": 0.1, "nc2_m": 0.1, "nc3": 0.1, "nc4": 0.0})
    assert better["verdict"] == "yes" and ": yes (nc1 0.1 vs 0.2; nc2_m 0.1 vs 0.125" in better[
        "text"]
    rowspace = {"nc1_rowspace": 0.004, "nc2_m_rowspace": 0.1, "nc3_duality_rowspace": 0.1}
    frozen = collapse(tmp_path / "rowspace", {**BASE_FINALS, **rowspace, "nc1_rowspace": 0.5},
                      {**BASE_FINALS, **rowspace})
    assert frozen["verdict"] == "no" and ": no: nc1_rowspace 0.5 vs 0.004 (" in frozen["text"]
    unjudged = collapse(tmp_path / "unjudged", {**BASE_FINALS, **rowspace, "nc1_rowspace": 0.5})
    assert unjudged["verdict"] == "yes"
    assert "nc1_rowspace, nc2_m_rowspace, nc3_duality_rowspace not recorded for the baseline" in (
        unjudged["text"])


def test_runs_differing_in_a_data_variant_are_separate_rows(sweeps: Path,
                                                           variant_sweep: Path) -> None:
    runs = load_runs([sweeps / "card", variant_sweep])
    table = claims_table(runs).set_index(["condition", "setting"])
    assert sorted(set(table.index.get_level_values("condition"))) == [
        "dataset.test_fraction=0.3", "none"]
    for condition, source, seeds in (("none", sweeps / "card", "0,1"),
                                     ("dataset.test_fraction=0.3", variant_sweep, "0")):
        mine = {(f.read_run()["head"], f.read_run()["feature_dim"]): f.read_summary()
                for f in folders(source)}
        for head, dim, setting in (("etf", 10, "etf, d=K"), ("learned", 512, "learned, d=large")):
            cell = table.loc[(condition, setting)]
            summaries = [v for (h, d), v in mine.items() if (h, d) == (head, dim)]
            assert cell["seeds"] == seeds and cell["n_done"] == len(seeds.split(","))
            accs = [f.read_summary()["test_acc"] for f in folders(source)
                    if (f.read_run()["head"], f.read_run()["feature_dim"]) == (head, dim)]
            assert cell["test_acc_mean"] == pytest.approx(sum(accs) / len(accs), rel=1e-12)
            assert cell["params_trainable_min"] == cell["params_trainable_max"] == summaries[0][
                "params_trainable"]
    verdicts = claim_verdicts(claims_table(runs))
    assert sorted(set(verdicts["condition"])) == ["dataset.test_fraction=0.3", "none"]
    assert len(verdicts) == 10 and "n/a" not in set(verdicts.loc[
        verdicts["claim"] == "accuracy", "verdict"])
    assert set(runs.loc[runs["run_key"].str.contains("test_fraction"), "variant"]) == {
        "arch.width=32 dataset.test_fraction=0.3 trainer.epochs=2 trainer.eval_every=1"}


def test_a_null_group_is_a_group_of_its_own_and_keeps_every_run() -> None:
    runs = hand_runs()
    runs["imbalance"] = [None if loss == "ce" else "exp" for loss in runs["loss"]]
    keys = ["dataset", "arch", "loss", "imbalance"]
    table = claims_table(runs, keys)
    assert sorted(set(table["imbalance"])) == ["exp", "none"]
    assert table["n_done"].sum() == (runs["status"] == "done").sum()
    assert table["n_done"].sum() + table["n_failed"].sum() == len(runs)
    none = table[table["imbalance"] == "none"].set_index("setting")
    assert none.loc["etf, d=K", "test_acc_mean"] == pytest.approx(0.91)
    assert set(claim_verdicts(table, keys)["imbalance"]) == {"exp", "none"}
    mixed = claims_table(runs)
    assert sorted(set(mixed["condition"])) == ["none"]
    apart = claims_table(runs, ["dataset", "arch"])
    assert sorted(set(apart["condition"])) == ["loss=ce", "loss=mse"]
    assert apart["n_done"].sum() + apart["n_failed"].sum() == len(runs)


def test_a_recorded_option_splits_rows_and_a_learned_baseline_serves_each_embedding() -> None:
    runs = hand_runs()
    runs = runs[runs["loss"] == "ce"].copy()
    runs["freeze"] = [bool(s == 2) for s in runs["seed"]]
    table = claims_table(runs).set_index(["condition", "setting"])
    assert sorted(set(table.index.get_level_values(0))) == ["freeze=false", "freeze=true"]
    assert table.loc[("freeze=true", "etf, d=K"), "seeds"] == "2"
    assert table.loc[("freeze=false", "etf, d=K"), "test_acc_mean"] == pytest.approx(0.905)
    runs = hand_runs()
    runs = runs[runs["loss"] == "ce"].copy()
    runs["embedding"] = [None if h == "learned" else ("random" if s == 0 else "coordinate")
                         for h, s in zip(runs["head"], runs["seed"], strict=True)]
    table = claims_table(runs).set_index(["condition", "setting"])
    assert sorted(set(table.index.get_level_values(0))) == [
        "embedding=coordinate", "embedding=random"]
    for condition in ("embedding=coordinate", "embedding=random"):
        assert table.loc[(condition, "learned, d=large"), "seeds"] == "0,1,2"
    assert table.loc[("embedding=random", "etf, d=K"), "seeds"] == "0"
    assert table.loc[("embedding=coordinate", "etf, d=K"), "test_acc_mean"] == pytest.approx(
        0.92)


def test_parameters_are_one_value_or_the_range_never_a_mean() -> None:
    runs = hand_runs()
    table = claims_table(runs)
    group = {"dataset": "cifar10", "arch": "resnet18", "loss": "ce", "condition": "none"}
    shown = format_claims(table, group)
    assert shown.loc["trainable params", "etf, d=K"] == "8,867,542"
    assert shown.loc["total params", "etf, d=K"] == "8,867,642"
    changed = (runs["loss"] == "ce") & (runs["head"] == "etf") & (runs["feature_dim"] == 10)
    runs.loc[changed & (runs["seed"] == 1), "params_trainable"] = 8_867_742
    table = claims_table(runs)
    cell = table[(table["loss"] == "ce") & (table["setting"] == "etf, d=K")].iloc[0]
    assert (cell["params_trainable_min"], cell["params_trainable_max"]) == (8_867_542, 8_867_742)
    shown = format_claims(table, group)
    assert shown.loc["trainable params", "etf, d=K"] == "8,867,542-8,867,742"
    assert shown.loc["trainable params saved", "etf, d=K"] == "-"
    mean = f"{cell['params_trainable_mean']:,.0f}"
    assert mean not in shown.to_string()
    verdict = claim_verdicts(table).set_index(["loss", "claim"]).loc[("ce", "parameters")]
    assert verdict["verdict"] == "n/a"
    assert "vary within a cell (8,867,542-8,867,742 vs 11,181,642)" in verdict["text"]


def md_tables(md: str) -> list[dict[str, list[str]]]:
    """Every pipe table of a report.md as {row label: cells}."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            current = {} if current is None else current
            current[cells[0]] = cells[1:]
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def test_hand_written_folders_header_counts_equal_the_rows_shown(tmp_path: Path) -> None:
    sweep = hand_sweep(tmp_path / "sweep" / "plain", BASE_FINALS)
    for head in ("learned", "etf"):
        for dim in (10, 512):
            for seed in (0, 1, 2):
                name = f"dataset.imbalance=exp,dim={dim},head={head},seed={seed}"
                write_folder(tmp_path / "sweep" / "exp" / name, head, dim, seed, BASE_FINALS,
                             embedding="coordinate", recorded={"imbalance": "exp"})
    write_folder(sweep / "dim=8,head=learned,seed=0", "learned", 8, 0, BASE_FINALS)
    failed = sweep / "dim=K,head=etf,seed=2"
    write_folder(failed, "etf", 10, 2, BASE_FINALS, embedding="coordinate")
    (failed / "DONE").unlink()
    (failed / "FAILED").write_text("RuntimeError: boom\n")
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--group-by",
                 "dataset,arch,loss,imbalance"]) == 0
    md = (out / "report.md").read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 8 + 12 + 1 + 1
    assert f"**{len(runs)} runs**: 21 done, 1 failed." in md
    assert "Of the 21 finished runs: 20 in the claims tables below (2 sections), 1 in other " \
           "head x d settings (named below)." in md
    assert "### dataset=digits / arch=mlp / loss=ce / imbalance=exp" in md
    assert "### dataset=digits / arch=mlp / loss=ce / imbalance=none" in md
    tables = [t for t in md_tables(md) if "finished runs (seeds)" in t]
    shown = [int(cell.split(" ")[0]) for t in tables for cell in t["finished runs (seeds)"]]
    failed_shown = [int(cell.split(" / ")[0]) for t in tables
                    for cell in t["failed / running / diverged"]]
    assert sorted(shown) == [2, 2, 2, 2, 3, 3, 3, 3] and sum(shown) == 20
    assert sum(failed_shown) == 1
    assert "other settings, not in the table: learned, d=8" in md
    assert md.split("## Runs not averaged")[1].count("RuntimeError: boom") == 1
    assert (out / "curves-digits-mlp-ce-exp.png").exists()
    assert (out / "curves-digits-mlp-ce-none.png").exists()
    together = tmp_path / "together"
    assert main([str(tmp_path / "sweep"), "--out", str(together)]) == 0
    md = (together / "report.md").read_text()
    assert "### dataset=digits / arch=mlp / loss=ce: dataset.imbalance=exp" in md
    assert "### dataset=digits / arch=mlp / loss=ce: none\n" in md
    assert "Of the 21 finished runs: 20 in the claims tables below (2 sections)" in md
    assert "mean over seeds" not in md and "WARNING" not in md
