"""Transfer: arch.weights and arch.freeze on every architecture, strict by default, recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ncsweep.tracking import RunFolder
from tests.support import FAST, run_cli

SOURCE = [*FAST, "trainer.epochs=3", "trainer.eval_every=3", "arch.width=32"]
FEATURE_METRICS = ("nc1", "nc2_m", "nc2_equinorm_m", "cdnv", "trace_ratio", "m_norm_mean")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished digits MLP run whose folder name holds ',' and '=' (dim=K,head=etf)."""
    root = tmp_path_factory.mktemp("source")
    result = run_cli([*SOURCE, "dim=K", "head=etf"], root)
    assert result.returncode == 0, result.stderr
    [folder] = (root / "outputs" / "default").iterdir()
    assert "," in folder.name and "=" in folder.name
    return folder


def test_a_run_starts_from_another_runs_checkpoint(job_runner, source_run: Path) -> None:
    checkpoint = source_run / "checkpoint.pt"
    out, summary = job_runner([*SOURCE, "dim=K", "head=etf", f'arch.weights="{checkpoint}"',
                               "arch.freeze=all", "trainer.epochs=0"], folder="transfer")
    first = RunFolder(out).read_metrics()[0]
    final = RunFolder(source_run).read_summary()
    for key in FEATURE_METRICS:  # the same features on the same data
        assert first[key] == final[key], key
    assert summary["weights"] == str(checkpoint) and summary["freeze"] == "all"
    assert summary["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert summary["weights_loaded"] == len(torch.load(checkpoint, weights_only=True)["model"]) - 2
    assert summary["weights_missing"] == summary["weights_unexpected"] == []
    assert summary["params_trainable"] == 10  # everything frozen but the ETF head's bias


def test_freeze_all_but_last_block_trains_only_the_feature_layer(job_runner) -> None:
    _, summary = job_runner([*SOURCE, "dim=K", "arch.freeze=all_but_last_block"])
    feature_layer = 32 * 10 + 10 + 2 * 10  # Linear(32, 10) + BatchNorm1d(10)
    assert summary["params_trainable"] == feature_layer + 10 * 10 + 10
    assert summary["freeze"] == "all_but_last_block" and summary["weights"] is None


def _refusal(job_runner, capsys, weights: Path, extra: list[str] = ()) -> str:
    with pytest.raises(SystemExit):
        job_runner([*SOURCE, "dim=K", f'arch.weights="{weights}"', *extra], folder="refused")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_files_that_are_not_matching_state_dicts_are_refused(job_runner, capsys, tmp_path: Path,
                                                               source_run: Path) -> None:
    text, saved_list = tmp_path / "notes.txt", tmp_path / "list.pt"
    text.write_text("not weights")
    torch.save([1, 2, 3], saved_list)
    assert "arch.weights=" in _refusal(job_runner, capsys, text)
    assert "cannot be read as one (UnpicklingError)" in _refusal(job_runner, capsys, text)
    assert f"{saved_list} holds a list" in _refusal(job_runner, capsys, saved_list)
    wider = tmp_path / "wider.pt"
    state = torch.load(source_run / "checkpoint.pt", weights_only=True)["model"]
    torch.save({k: torch.cat([v, v]) if k == "backbone.layers.1.weight" else v
                for k, v in state.items()}, wider)
    line = _refusal(job_runner, capsys, wider)
    assert "20 of 21 tensors match (shape differs: layers.1.weight)" in line
    assert "arch.weights_strict=false loads the matching ones" in line
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    out, summary = job_runner([*SOURCE, "dim=K", f'arch.weights="{wider}"',
                               "arch.weights_strict=false"], folder="partial")
    assert summary["weights_loaded"] == 20 and summary["weights_reshaped"] == ["layers.1.weight"]
    assert json.loads((out / "summary.json").read_text())["weights_strict"] is False


def test_an_image_backbone_refuses_an_mlp_checkpoint_in_one_line(tmp_path: Path,
                                                                 source_run: Path) -> None:
    result = run_cli([*FAST, "arch=resnet18", "dataset=cifar10", "trainer.dry_run=true",
                      "trainer.batch_size=2", f'arch.weights="{source_run / "checkpoint.pt"}"'],
                     tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ncsweep: error: arch.weights=") and "0 of 120 tensors match" in line
