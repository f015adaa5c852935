"""Bad input on the real CLI: one ``ncsweep: error:`` line naming the key, the value and what is
allowed, a non-zero exit, nothing that looks finished, and no torch on the config-error path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ncsweep.config import ConfigError, command_overrides, validate
from ncsweep.preflight import check_command, compositions
from tests.support import CONF, DDP_MLP, FAST, LOCAL_RANKS, compose_cfg, run_cli

GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


def assert_refused(result: subprocess.CompletedProcess, root: Path, *fragments: str) -> str:
    """The one error line, after checking everything a refusal promises."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncsweep: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not list(root.glob("**/DONE")) and not list(root.glob("**/summary.json"))
    return lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["trainer.epoch=5"], ["trainer.epoch='5' is not allowed: no such key",
                           "(did you mean trainer.epochs?)"]),
    (["trainer.batchsize=8"], ["trainer.batchsize='8'", "did you mean trainer.batch_size"]),
    (["schedule.milestones=[1]"], ["schedule.milestones='[1]' is not allowed: schedule.milestones "
                                   "exists only under schedule=multistep (this run has "
                                   "schedule=cosine)"]),
    (["foo.bar=1"], ["foo.bar='1' is not allowed: no such key", "trainer"]),
    (["sched=cosine"], ["sched='cosine' is not allowed: no such key (did you mean schedule?)"]),
    (["head=etff"], ["head='etff' is not allowed: one of etf, learned (did you mean etf?)"]),
    (["+trainer.epochs=3"], ["+trainer.epochs='3' is not allowed: trainer.epochs exists already: "
                             "set it without + (trainer.epochs=3)"]),
    (["hydra/launcher=nope"], ["hydra/launcher='nope' is not allowed: one of basic"]),
    (["~trainer.epoch"], ["~trainer.epoch", "did you mean trainer.epochs?"]),
    (["seed=abc"], ["seed='abc' is not allowed: an integer"]),
    (["seed=1.5"], ["seed='1.5' is not allowed: an integer"]),
    (["seed=1,2"], ["seed='1,2' is not allowed: one value without -m"]),
    (["-m", "seed=0,1.5"], ["seed='1.5' is not allowed: an integer"]),
    (["-m", "seed=range(0,10000)", "trainer.epoch=1"], ["trainer.epoch='1'",
                                                        "did you mean trainer.epochs?"]),
    (["-m", "schedule=cosine,multistep", "schedule.milestones=[1]"],
     ["schedule.milestones exists only under schedule=multistep"]),
    (["-m", "seed=0,1", "hydra.launcher.nodes=2"],
     ["hydra.launcher.nodes='2'", "exists only under launcher=local or launcher=slurm"]),
])
def test_a_bad_key_or_value_is_one_line_with_what_is_allowed(
        tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_refused(run_cli([*args, *FAST], tmp_path, timeout=120), tmp_path, *fragments)
    assert not list(tmp_path.glob("outputs/*")) and not list(tmp_path.glob("multirun/*"))


def unwritable(tmp_path: Path) -> list[str]:
    """Folders no user can create: under a file, and under /proc where there is one."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [str(blocker / "x"), *(["/proc/x"] if Path("/proc/self").exists() else [])]


@pytest.mark.parametrize("key,extra", [("hydra.run.dir", []),
                                       ("hydra.sweep.dir", ["-m", "seed=0,1"])])
def test_an_unwritable_run_or_sweep_folder_is_refused_before_anything_runs(
        tmp_path: Path, key: str, extra: list[str]) -> None:
    for folder in unwritable(tmp_path):
        result = run_cli([*extra, f"{key}={folder}", *FAST], tmp_path, timeout=120)
        line = assert_refused(result, tmp_path, f"{key}='{folder}' is not allowed",
                              "a folder you can write")
        assert "Traceback" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def missing_devices() -> list[tuple[str, str]]:
    """Devices this machine lacks, with the reason the refusal gives."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [(f"cuda:{count}", "no CUDA device here" if count == 0 else
                f"this machine has {count} CUDA device(s)")]
    if count == 0:
        missing.append(("cuda", "no CUDA device here"))
    if not torch.backends.mps.is_available():
        missing.append(("mps", "no MPS device here"))
    return missing


def test_a_device_this_machine_lacks_is_one_line_before_any_model(tmp_path: Path) -> None:
    for device, reason in missing_devices():
        result = run_cli([f"trainer.device={device}", *FAST], tmp_path, timeout=120)
        assert_refused(result, tmp_path, f"trainer.device='{device}' is not allowed: {reason}",
                       "auto or cpu" if "no " in reason else "auto, cpu")
        assert "NVIDIA driver" not in result.stderr
    [(beyond, reason)] = missing_devices()[:1]
    swept = run_cli(["-m", f"trainer.device=cpu,{beyond}", "seed=0,1", *FAST], tmp_path,
                    timeout=120)
    assert_refused(swept, tmp_path, f"trainer.device='{beyond}' is not allowed: {reason}")
    assert not (tmp_path / "multirun").exists()


def test_config_errors_never_import_torch(tmp_path: Path) -> None:
    for args in (["trainer.epoch=5"], ["seed=abc"], ["hydra.run.dir=/proc/x"]):
        result = run_cli([*args, *FAST], tmp_path, timeout=120,
                         env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode != 0 and "ncsweep: error: " in result.stderr
        imported = re.findall(r"\|\s+(torch|numpy)(?:\.|\s*$)", result.stderr, re.MULTILINE)
        assert not imported, f"{args} imported {sorted(set(imported))}"


def test_a_sweep_composes_once_per_group_option_its_keys_depend_on() -> None:
    seeds = command_overrides(["seed=range(0,10000)", "trainer.epochs=1", "head=etf,learned"])
    assert list(compositions(seeds, GROUPS)) == [["seed=0", "trainer.epochs=1", "head=etf"]]
    scheduled = command_overrides(["schedule=cosine,multistep", "schedule.milestones=[1]"])
    assert list(compositions(scheduled, GROUPS)) == [
        ["schedule=cosine", "schedule.milestones=[1]"],
        ["schedule=multistep", "schedule.milestones=[1]"]]


def test_keys_of_the_chosen_options_pass(tmp_path: Path) -> None:
    check_command(["-m", "optim=lbfgs", "optim.max_iter=3", "launcher=slurm", "seed=range(0,9)",
                   "hydra.launcher.nodes=2", f"hydra.sweep.dir={tmp_path}/s", "+foo=1"], CONF)
    check_command(["schedule=multistep", "schedule.milestones=[1,2]", "~head.seed", "head=etf",
                   f"hydra.run.dir={tmp_path}/r"], CONF)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", ["abc", 1.5, True, None])
def test_validate_refuses_a_seed_that_is_not_an_integer(seed: object) -> None:
    cfg = compose_cfg([])
    cfg.seed = seed
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == "seed" and "an integer" in str(err.value)


def test_validate_refuses_a_device_this_machine_lacks() -> None:
    """The job's own check: what a cluster node finds, where the submitting host cannot know."""
    for device, reason in missing_devices():
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg([f"trainer.device={device}"]))
        assert err.value.key == "trainer.device" and reason in str(err.value)


@pytest.mark.parametrize("args", [["dim=100000000"], ["experiment=ufm", "dim=100000000"]])
def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(
        tmp_path: Path, args: list[str]) -> None:
    # 1e8 features: 400 MB a parameter row, hundreds of GiB in all, sized on the meta device
    line = assert_refused(run_cli([*args, *FAST], tmp_path, timeout=120), tmp_path,
                          "dim=100000000 is not allowed: a model whose parameters fit in memory")
    size, _ = re.search(r"holds ([\d.]+ \w+) of parameters alone .* the ([\d.]+ \w+) free",
                           line).groups()
    assert size.endswith("GiB") or size.endswith("TiB"), line
    assert not list(tmp_path.glob("**/checkpoint.pt"))


def test_what_cannot_use_several_ranks_is_refused_before_submission(tmp_path: Path) -> None:
    for extra, key in ((["hydra.launcher.nodes=2"], "hydra.launcher.nodes"),
                       (["hydra.launcher.runs_in_parallel=2"], "hydra.launcher.runs_in_parallel")):
        result = run_cli(["-m", *DDP_MLP, *LOCAL_RANKS, *extra], tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = [ln for ln in result.stderr.splitlines() if "error:" in ln]
        assert key in line, line
        assert not (tmp_path / "multirun" / "ddp" / ".ncsweep-jobs.jsonl").exists()
