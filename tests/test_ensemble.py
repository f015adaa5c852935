"""Seeds trained as one batched model: the same weights, data order and results as solo runs."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ncsweep.build import build_run
from ncsweep.config import ConfigError, validate
from ncsweep.data import batches
from ncsweep.ensemble import Stacked, build_members, check_supported, member_losses
from ncsweep.nc import KEYS
from ncsweep.nc.layers import BLOCK_KEYS, FIT_KEYS
from ncsweep.stopping import SIGNAL_AT_STEP
from ncsweep.tracking import RunFolder
from tests.support import compose_cfg, run_cli, run_cli_beside

SEEDS = "0,1,2,3"
# 1437 samples / 144: 10 steps. SGD: Adam divides by sqrt(v), which turns float32 rounding in
# a gradient that is truly zero (a bias that BN follows) into lr-sized steps; Adam is checked
# to float64 precision below.
TEN_STEPS = ["logger=none", "trainer.progress=false", "arch.width=32", "trainer.epochs=1",
             "trainer.batch_size=144", "trainer.eval_every=1", "optim=sgd", "name=ens",
             "nc.layers=all"]
COMPARED = ("train_loss", "train_acc", "test_loss", "test_acc", *KEYS)


def folders(root: Path) -> dict[int, RunFolder]:
    runs = [RunFolder(p.parent) for p in (root / "multirun" / "ens").glob("*/run.json")]
    return {f.read_run()["seed"]: f for f in runs}


def layout(folder: RunFolder) -> tuple:
    rows = folder.read_metrics()
    return (sorted(p.name for p in folder.path.iterdir()), sorted(folder.read_summary()),
            sorted(folder.read_run()), [sorted(r) for r in rows])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def solo_and_ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    solo, ens = tmp_path_factory.mktemp("solo"), tmp_path_factory.mktemp("ensemble")
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda a: run_cli(["-m", f"seed={SEEDS}", *TEN_STEPS, *a[1]],
                                                   a[0]), ((solo, []),
                                                           (ens, ["trainer.ensemble=true"])))
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "ensemble: 4 seeds (0, 1, 2, 3) as one batched model" in second.stdout
    assert "4 done" in first.stdout and "4 done" in second.stdout
    return solo, ens, second.stdout


def test_members_start_from_their_solo_runs_weights() -> None:
    configs = [validate(compose_cfg(["logger=none", f"seed={seed}", "arch.width=32"]))
               for seed in range(4)]
    stacked = Stacked([run.model for run in build_members(configs)])
    for r, plain in enumerate(configs):
        solo = build_run(plain).model
        named = [*solo.named_parameters(), *solo.named_buffers()]
        assert all(torch.equal(stacked.tensors[name][r], t) for name, t in named)
    assert not torch.equal(stacked.tensors["head.weight"][0], stacked.tensors["head.weight"][1])


def test_after_ten_steps_each_member_is_its_solo_run(solo_and_ensemble) -> None:
    solo, ens, _ = solo_and_ensemble
    for seed, folder in folders(ens).items():
        mine = torch.load(folder.file("checkpoint.pt"), weights_only=True)
        theirs = torch.load(folders(solo)[seed].file("checkpoint.pt"), weights_only=True)
        assert mine["step"] == theirs["step"] == 10
        assert torch.equal(mine["data_rng"], theirs["data_rng"])
        assert any(k.endswith("running_mean") for k in theirs["model"])
        for name, tensor in theirs["model"].items():
            if tensor.is_floating_point():
                assert relative(mine["model"][name], tensor) < 1e-5, name
            else:
                assert torch.equal(mine["model"][name], tensor), name
        assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()


def test_members_end_where_their_solo_runs_end_in_the_same_layout(solo_and_ensemble) -> None:
    solo, ens, _ = solo_and_ensemble
    for seed, folder in folders(ens).items():
        reference = folders(solo)[seed]
        mine, theirs = folder.read_summary(), reference.read_summary()
        assert mine["status"] == "done" and mine["ensemble"] == 4 and theirs["ensemble"] == 1
        for key in COMPARED:
            assert abs(mine[key] - theirs[key]) <= 1e-3, (seed, key, mine[key], theirs[key])
        assert layout(folder) == layout(reference)
        assert folder.path.name == reference.path.name  # trainer.ensemble is not in the run key
        assert folder.read_config()["trainer"]["ensemble"] is True


def test_each_members_block_metrics_are_its_solo_runs(solo_and_ensemble) -> None:
    solo, ens, _ = solo_and_ensemble
    for seed, folder in folders(ens).items():
        reference = folders(solo)[seed]
        for mine, theirs in zip(folder.read_metrics(), reference.read_metrics(), strict=True):
            keys = [k for k in theirs if k.startswith("layers")]
            assert len(keys) == 3 * len(BLOCK_KEYS) + len(FIT_KEYS), sorted(theirs)
            for key in keys:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-3), (seed, key)


def test_the_same_sweep_without_ensemble_skips_the_members(solo_and_ensemble) -> None:
    _, ens, _ = solo_and_ensemble
    again = run_cli(["-m", f"seed={SEEDS}", *TEN_STEPS], ens)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 skipped" in again.stdout


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the batched kernels on a GPU"))])
def test_the_batched_mlp_is_the_solo_mlp_to_float64_precision(device: str) -> None:
    runs = []
    for seed in (0, 1):
        cfg = compose_cfg(["logger=none", f"seed={seed}", "arch.width=32"])
        run = build_run(validate(cfg))
        runs.append(run)
        run.model.double().to(device).train()
    stacked = Stacked([r.model for r in runs])
    stacked.train()
    batched = torch.optim.Adam(stacked.trainable, lr=3e-3, weight_decay=5e-4)
    solos = [torch.optim.Adam([p for p in r.model.parameters() if p.requires_grad], lr=3e-3,
                              weight_decay=5e-4) for r in runs]
    streams = [batches(runs[0].data.train, 144, torch.Generator().manual_seed(s)) for s in (0, 1)]
    for pairs in zip(*streams, strict=True):
        pairs = [(xr.double().to(device), yr.to(device)) for xr, yr in pairs]
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
        batched.zero_grad()
        member_losses("ce", stacked(x), y).sum().backward()
        batched.step()
        for run, (xr, yr), optimizer in zip(runs, pairs, solos, strict=True):
            optimizer.zero_grad()
            run.loss(run.model(xr), yr).backward()
            optimizer.step()
    for r, run in enumerate(runs):
        for name, t in (*run.model.named_parameters(), *run.model.named_buffers()):
            assert stacked.tensors[name].device.type == device
            if t.is_floating_point():
                assert relative(stacked.tensors[name][r], t) < 1e-11, name


def test_a_ufm_ensemble_matches_single_runs_in_float64(tmp_path: Path) -> None:
    args = ["-m", "experiment=ufm", "optim=sgd", "optim.momentum=0", "optim.lr=0.5",
            "seed=0,1,2", "logger=none", "trainer.progress=false", "name=ens",
            "dataset.n_per_class=5", "trainer.epochs=40", "trainer.eval_every=10"]
    solo, ens = tmp_path / "solo", tmp_path / "ens"
    solo.mkdir()
    ens.mkdir()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: run_cli([*args, *a[1]], a[0]),
                                ((solo, []), (ens, ["trainer.ensemble=true"]))))
        assert all(r.returncode == 0 for r in results), [r.stderr[-3000:] for r in results]
    ens_runs = [RunFolder(p.parent) for p in (ens / "multirun" / "ens").glob("*/DONE")]
    assert len(ens_runs) == 3
    for folder in ens_runs:
        reference = RunFolder(solo / "multirun" / "ens" / folder.path.name)
        mine, theirs = folder.read_summary(), reference.read_summary()
        assert mine["ensemble"] == 3 and theirs["ensemble"] == 1
        assert abs(mine["objective"] - theirs["objective"]) <= 1e-9 * abs(theirs["objective"])
        assert mine["hessian_min_eig"] == pytest.approx(theirs["hessian_min_eig"], rel=1e-6)
        weights = torch.load(folder.file("checkpoint.pt"), weights_only=True)["model"]
        expected = torch.load(reference.file("checkpoint.pt"), weights_only=True)["model"]
        assert weights["backbone.features"].dtype == torch.float64
        for name, tensor in expected.items():
            if tensor.is_floating_point():
                assert relative(weights[name], tensor) < 1e-10, name


LONG = ["-m", "seed=0,1", "logger=none", "trainer.progress=false", "trainer.deterministic=true",
        "arch.width=64", "trainer.epochs=16", "trainer.eval_every=2",
        "trainer.checkpoint_every=1", "trainer.batch_size=64", "trainer.ensemble=true",
        "name=ens"]


def test_an_interrupted_ensemble_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    plain = run_cli_beside(LONG, reference)  # the uninterrupted ensemble
    root = tmp_path / "interrupted"
    root.mkdir()
    # 23 steps an epoch (1437 train samples in batches of 64): a SIGTERM in epoch 5, after the
    # eval rows of epochs 0, 2 and 4, at a fixed step so no timing decides where it stops
    stopped = run_cli(LONG, root, env={SIGNAL_AT_STEP: f"{4 * 23 + 11}:SIGTERM"})
    rows = [len(RunFolder(p.parent).read_metrics())
            for p in root.glob("multirun/ens/*/metrics.jsonl")]
    assert rows == [3, 3], "the ensemble was not interrupted where it was asked to stop"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    again = run_cli(LONG, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 done" in again.stdout and "ensemble: 2 seeds" in again.stdout
    assert plain.result().returncode == 0, plain.result().stderr[-3000:]
    for seed, folder in folders(root).items():
        expected = folders(reference)[seed]
        summary = folder.read_summary()
        assert summary["resumed_from_epoch"] >= 1 and summary["attempts"] == 2
        keys = ("epoch", "step", *COMPARED)
        assert ([{k: r[k] for k in keys} for r in folder.read_metrics()]
                == [{k: r[k] for k in keys} for r in expected.read_metrics()])


def test_lbfgs_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_cli(["trainer.ensemble=true", "optim=lbfgs", "logger=none"], tmp_path,
                     timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["ncsweep: error: optim='lbfgs' is not allowed: sgd, adam or adamw with "
                     "trainer.ensemble=true (elementwise optimisers; a line search couples a "
                     "member's steps)"], result.stderr


@pytest.mark.parametrize("overrides,key", [(["arch=resnet18", "dataset=cifar10"], "arch"),
                                           (["arch.freeze=all"], "arch.freeze"),
                                           (["experiment=ufm", "arch.starts=4"], "arch.starts")])
def test_unsupported_ensembles_are_refused(overrides: list[str], key: str) -> None:
    plain = validate(compose_cfg(["logger=none", "trainer.ensemble=true", *overrides]))
    with pytest.raises(ConfigError) as err:
        check_supported({**plain, "optim": {"_target_": "torch.optim.SGD"}})
    assert err.value.key == key and "with trainer.ensemble=true" in str(err.value)

