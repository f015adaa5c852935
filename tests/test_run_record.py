"""run.json: every run folder says what it is from the job's first second, failed ones too."""

from __future__ import annotations

import json

import pytest

from ncsweep.tracking import RunFolder
from tests.support import FAST, run_cli

SHORT = [*FAST, "trainer.epochs=2", "trainer.eval_every=2", "arch.width=32"]


def test_run_json_records_identity_and_matches_the_summary(job_runner) -> None:
    out, summary = job_runner([*SHORT, "head=etf", "dim=K", "optim=sgd", "seed=2"])
    run = RunFolder(out).read_run()
    assert run["format"] == "ncsweep-run-1"
    assert (run["dataset"], run["arch"], run["head"], run["loss"], run["optim"]) == (
        "digits", "mlp", "etf", "ce", "sgd")
    assert (run["dim"], run["feature_dim"], run["num_classes"], run["seed"]) == ("K", 10, 10, 2)
    assert run["embedding"] == "coordinate" and run["experiment"] is None
    assert "head=etf" in run["overrides"] and run["run_key"] == out.name
    for key in ("dataset", "arch", "head", "optim", "feature_dim", "seed", "embedding",
                "code_commit"):
        assert summary[key] == run[key], key
    assert "optimizer" not in summary


def test_a_learned_head_has_no_embedding(job_runner) -> None:
    out, _ = job_runner(SHORT)
    assert RunFolder(out).read_run()["embedding"] is None


def test_a_run_failing_validation_still_describes_itself(job_runner, tmp_path) -> None:
    with pytest.raises(SystemExit):
        job_runner([*SHORT, "head=etf", "dim=3"], folder="bad")
    folder = RunFolder(tmp_path / "bad")
    run = folder.read_run()
    assert (run["head"], run["dim"], run["feature_dim"]) == ("etf", "3", 3)
    assert folder.status == "failed" and not folder.file("summary.json").exists()


def test_a_builder_config_error_is_one_line_alone_and_a_failed_job_in_a_sweep(tmp_path) -> None:
    single = run_cli([*SHORT, "arch.activation=swish"], cwd=tmp_path)
    assert single.returncode == 1
    assert single.stderr.strip().splitlines() == [
        "ncsweep: error: arch.activation='swish' is not allowed: one of relu, gelu, tanh, silu"]
    sweep = run_cli(["-m", *SHORT, "name=mix", "arch.activation=relu,swish"], cwd=tmp_path)
    assert sweep.returncode == 1 and "1 done, 1 failed" in sweep.stdout, sweep.stdout
    (path,) = (tmp_path / "multirun" / "mix").glob("arch.activation=swish*")
    failed = RunFolder(path)
    assert failed.status == "failed"
    assert failed.file("FAILED").read_text().strip() == (
        "ConfigError: arch.activation='swish' is not allowed: one of relu, gelu, tanh, silu")
    assert json.loads(failed.file("run.json").read_text())["arch"] == "mlp"
    assert "Traceback" not in sweep.stderr


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path) -> None:
    import torch

    from ncsweep.tracking import CheckpointError

    folder = RunFolder(tmp_path)
    torch.save({"format": "ncsweep-checkpoint-0", "run_key": "k", "epoch": 1},
               folder.file("checkpoint.pt"))
    with pytest.raises(CheckpointError) as err:
        folder.load_checkpoint("k")
    message = str(err.value)
    assert "'ncsweep-checkpoint-0'" in message and "ncsweep-checkpoint-1" in message
    assert "\n" not in message


def test_a_checkpoint_without_the_batch_fields_resumes_at_the_configured_batch() -> None:
    from ncsweep.training import check_global_batch

    check_global_batch({"epoch": 2, "batch": 0, "step": 10}, 64)  # no global_batch_size
