"""Collapse through depth end to end: a real run's per-block rows against an independent float64
computation from the final weights, the UFM without layers, and nc.layers refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ncsweep.build import build_run
from ncsweep.config import validate
from ncsweep.data import DataBundle, Split
from ncsweep.heads import LearnedHead
from ncsweep.losses import CrossEntropy
from ncsweep.models import MLP, Network, ResNet
from ncsweep.nc.blocks import select_blocks
from ncsweep.nc.layers import BLOCK_KEYS, FIT_KEYS, layer_key
from ncsweep.report import load
from ncsweep.report.__main__ import main
from ncsweep.report.wandb_log import wandb_offline_files
from ncsweep.tracking import RunFolder
from ncsweep.training import evaluate
from tests.support import FAST, block_reference, compose_cfg, run_cli

RTOL = 1e-9
SHORT = [*FAST, "trainer.epochs=3", "trainer.eval_every=3", "arch.width=48", "dim=24",
         "nc.layers=all"]
MLP_BLOCKS = ("hidden1", "hidden2", "features")




@torch.no_grad()
def mlp_block_features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The MLP's blocks in float64 from the test's own hooks: each Linear group's ReLU."""
    relus = [m for m in model.backbone.layers if isinstance(m, torch.nn.ReLU)]
    raw: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: raw.__setitem__(
        name, out.detach().clone())) for name, m in zip(MLP_BLOCKS, relus, strict=True)]
    model.eval()
    model(x)
    for handle in handles:
        handle.remove()
    return {name: t.numpy().astype(np.float64) for name, t in raw.items()}


def test_a_real_runs_block_rows_equal_a_float64_computation_from_its_weights(job_runner):
    out, summary = job_runner(SHORT)
    folder = RunFolder(out)
    final = folder.read_metrics()[-1]
    assert final["epoch"] == 3
    run = build_run(validate(compose_cfg(SHORT)))
    state = torch.load(folder.file("checkpoint.pt"), weights_only=True)
    run.model.load_state_dict(state["model"])
    train, test = run.data.train, run.data.test
    h = mlp_block_features(run.model, train.inputs)
    h_test = mlp_block_features(run.model, test.inputs)
    y, y_test = train.labels.numpy(), test.labels.numpy()
    nc1 = []
    for block in MLP_BLOCKS:
        want = block_reference(h[block], y, h_test[block], y_test, run.data.num_classes)
        for key in BLOCK_KEYS:
            got = final[layer_key(block, key)]
            assert got == pytest.approx(want[key], rel=RTOL), (block, key)
            assert summary[layer_key(block, key)] == got
        nc1.append(want["nc1"])
    slope, intercept = np.polyfit(np.arange(3), np.log10(nc1), 1)
    fitted = intercept + slope * np.arange(3)
    r2 = 1 - np.square(np.log10(nc1) - fitted).sum() / np.square(
        np.log10(nc1) - np.mean(np.log10(nc1))).sum()
    assert final["layers_decay_ratio"] == pytest.approx(10.0**slope, rel=1e-9)
    assert final["layers_r2"] == pytest.approx(r2, rel=1e-9, abs=1e-12)
    assert final[layer_key("features", "nc1")] == pytest.approx(final["nc1"], rel=RTOL)


def test_named_blocks_and_last_log_only_those(job_runner):
    _, named = job_runner([*SHORT[:-1], "nc.layers=[hidden2]"], folder="named")
    _, last = job_runner([*SHORT[:-1], "nc.layers=last"], folder="last")
    _, none = job_runner([*SHORT[:-1], "nc.layers=null"], folder="none")
    assert {k for k in named if k.startswith("layers")} == {
        layer_key("hidden2", key) for key in BLOCK_KEYS}
    assert {k for k in last if k.startswith("layers")} == {
        layer_key("features", key) for key in BLOCK_KEYS}
    assert not [k for k in none if k.startswith("layers")]
    assert named["nc1"] == last["nc1"] == none["nc1"]


def test_the_ufm_logs_no_layers(job_runner):
    _, summary = job_runner([*FAST, "experiment=ufm", "dataset.num_classes=4",
                             "dataset.n_per_class=5", "trainer.epochs=2", "optim.max_iter=3"])
    assert summary["status"] == "done"
    assert not [k for k in summary if k.startswith("layers") or k in FIT_KEYS]


def test_a_name_that_is_not_a_block_is_one_line(tmp_path: Path) -> None:
    result = run_cli([*FAST, "nc.layers=[hidden1,stage3]"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "ncsweep: error: nc.layers='stage3' is not allowed: all, last, or a list of this "
        "architecture's blocks: hidden1, hidden2, features")
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/checkpoint.pt"))


def test_block_rows_reach_wandb_and_runs_csv_as_in_the_run_folder(tmp_path: Path) -> None:
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}
    args = ["-m", "trainer.progress=false", "trainer.epochs=2", "trainer.eval_every=1",
            "arch.width=32", "nc.layers=all", "name=depth"]
    result = run_cli(args, tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    [summary] = (tmp_path / "multirun" / "depth").glob("*/summary.json")
    mine, my_history = load(summary.parent)
    theirs, their_history = load(wandb_offline_files(summary.parent)[0].parent)
    keys = [k for k in mine.columns if k.startswith("layers")]
    assert len(keys) == 3 * len(BLOCK_KEYS) + len(FIT_KEYS)
    for key in keys:
        assert theirs[key].iloc[0] == pytest.approx(mine[key].iloc[0], rel=1e-12), key
        assert list(their_history[key]) == pytest.approx(list(my_history[key]), rel=1e-12)
    assert main([str(tmp_path / "multirun"), "--out", str(tmp_path / "report")]) == 0
    csv = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert csv[keys].iloc[0].tolist() == pytest.approx(mine[keys].iloc[0].tolist(), rel=1e-12)


@torch.no_grad()
def blobs(k: int, shape: tuple[int, ...], gap: float, n_train: int, n_test: int) -> DataBundle:
    """K classes of Gaussian noise around means ``gap`` x class index apart (seeds 1 and 2)."""
    def split(n: int, seed: int) -> Split:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % k
        return Split(y[:, None, None, None] * gap + torch.randn(n, *shape, generator=g), y)

    return DataBundle("blobs", k, shape, split(n_train, 1), split(n_test, 2))


def test_evaluate_on_a_small_resnet_equals_pooled_float64_features_and_a_second_pass() -> None:
    torch.manual_seed(0)
    k, shape = 4, (3, 16, 16)
    model = Network(ResNet(shape, 32, "resnet18", stem="cifar"), LearnedHead(k, 32)).eval()

    data = blobs(k, shape, 0.5, 40, 24)
    blocks = select_blocks(model, "all")
    kept = evaluate(model, CrossEntropy(), data, 16, 2**30, blocks)
    second = evaluate(model, CrossEntropy(), data, 16, 1024, blocks)
    plain = evaluate(model, CrossEntropy(), data, 16, 2**30)
    own = {"stem": model.backbone.maxpool, "stage1": model.backbone.layer1,
           "stage2": model.backbone.layer2, "stage3": model.backbone.layer3,
           "stage4": model.backbone.layer4}
    assert [b.name for b in blocks] == list(own)

    def pooled(x: torch.Tensor) -> dict[str, np.ndarray]:
        raw: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, name=name: raw.__setitem__(
            name, out.detach().clone())) for name, m in own.items()]
        model(x)
        for handle in handles:
            handle.remove()
        return {n: t.numpy().astype(np.float64).mean(axis=(2, 3)) for n, t in raw.items()}

    h, h_test = pooled(data.train.inputs), pooled(data.test.inputs)
    for name in own:
        want = block_reference(h[name], data.train.labels.numpy(), h_test[name],
                         data.test.labels.numpy(), k)
        for key in BLOCK_KEYS:
            assert kept[layer_key(name, key)] == pytest.approx(want[key], rel=RTOL), (name, key)
    assert second == pytest.approx(kept, rel=1e-12)
    assert {k: v for k, v in kept.items() if not k.startswith("layers")} == plain


def test_the_mlp_features_block_is_the_head_level_metrics_kept_or_streamed() -> None:
    """The MLP's last block is the head's input: its keys come from the eval point's own NC
    accumulator (no second copy), equal the float64 reference, and equal themselves when both
    the accumulator and the blocks run a second pass; a block marked wrongly is refused."""
    torch.manual_seed(0)
    k, shape = 4, (1, 6, 6)
    model = Network(MLP(shape, 12, width=16, depth=2), LearnedHead(k, 12)).eval()

    data = blobs(k, shape, 0.7, 60, 28)
    blocks = select_blocks(model, "all")
    assert [(b.name, b.head_input) for b in blocks] == [
        ("hidden1", False), ("hidden2", False), ("features", True)]
    kept = evaluate(model, CrossEntropy(), data, 16, 2**30, blocks)
    streamed = evaluate(model, CrossEntropy(), data, 16, 0, blocks)
    assert streamed == pytest.approx(kept, rel=1e-12)
    h = mlp_block_features(model, data.train.inputs)
    h_test = mlp_block_features(model, data.test.inputs)
    for name in MLP_BLOCKS:
        want = block_reference(h[name], data.train.labels.numpy(), h_test[name],
                               data.test.labels.numpy(), k)
        for key in BLOCK_KEYS:
            assert kept[layer_key(name, key)] == pytest.approx(want[key], rel=RTOL), (name, key)
    for key in ("nc1", "cdnv", "trace_ratio"):
        assert kept[layer_key("features", key)] == kept[key]
    wrong = [blocks[0]._replace(head_input=True), *blocks[1:2]]
    with pytest.raises(RuntimeError, match="'hidden1' is marked as the head's input"):
        evaluate(model, CrossEntropy(), data, 16, 2**30, wrong)

