"""Collapse through depth: per-block NC metrics against an independent float64 computation,
the data-separation fit against numpy.polyfit, ranks against one process, and nc.layers.

The distributed test starts real processes (gloo on 127.0.0.1); this file is also their worker:
``python tests/test_layers.py <rank> <world> <port> <out_dir>``.
"""

from __future__ import annotations

import itertools
import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ncsweep.errors import ConfigError
from ncsweep.models import MLP, ResNet, UFMFeatures
from ncsweep.nc import nc_metrics
from ncsweep.nc.blocks import named_blocks, select_blocks
from ncsweep.nc.centres import NearestCentreTally
from ncsweep.nc.classstats import ClassStats
from ncsweep.nc.layers import LayerMetrics, data_separation_fit, layer_key
from ncsweep.nc.probe import capture
from tests.support import block_reference, run_two_ranks

K = 4
N_TRAIN, N_TEST = 44, 26
BATCHES = (0, 7, 20, 44)
RTOL = 1e-9
NOISE = 2.0
WORKER_TIMEOUT_S = 120
METRICS = ("nc1", "cdnv", "trace_ratio", "ncc_acc_train", "ncc_acc_test")


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((1, 6, 6), feature_dim=10, width=24, depth=2).eval()


def make_resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet((3, 16, 16), feature_dim=512, variant="resnet18", stem="cifar").eval()


def own_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The test's own choice of each block's module, by name (not through ncsweep.nc.blocks)."""
    if isinstance(model, ResNet):
        return {"stem": model.maxpool, "stage1": model.layer1, "stage2": model.layer2,
                "stage3": model.layer3, "stage4": model.layer4}
    return {"hidden1": model.layers[3], "hidden2": model.layers[6], "features": model.layers[9]}


def data(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs around one random centre per class, every class present."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, *shape, generator=torch.Generator().manual_seed(99))
    y = torch.cat([torch.arange(K), torch.randint(0, K, (n - K,), generator=g)])
    return centres[y] + NOISE * torch.randn(n, *shape, generator=g), y


@torch.no_grad()
def own_features(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each block's output in float64 numpy from hooks of the test's own; maps -> channel means."""
    raw: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: raw.__setitem__(
        name, out.detach().clone())) for name, m in own_modules(model).items()]
    model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, t in raw.items():
        a = t.numpy().astype(np.float64)
        out[name] = a.mean(axis=(2, 3)) if a.ndim == 4 else a.reshape(len(a), -1)
    return out


@torch.no_grad()
def run_layers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
               y_test: torch.Tensor, max_feature_bytes: int = 2**30) -> tuple[dict, LayerMetrics]:
    """LayerMetrics fed by probe.capture over uneven batches, as an eval pass would."""
    blocks = select_blocks(model, "all")
    layers = LayerMetrics([b.name for b in blocks], K, [b.depth for b in blocks],
                          max_feature_bytes=max_feature_bytes)
    with capture([(b.name, b.module) for b in blocks]) as outputs:
        for lo, hi in itertools.pairwise(BATCHES):
            model(x[lo:hi])
            layers.update(outputs.take(), y[lo:hi], copy=False)
        layers.all_reduce()
        if layers.needs_second_pass:
            for lo, hi in itertools.pairwise(BATCHES):
                model(x[lo:hi])
                layers.update_train_ncc(outputs.take(), y[lo:hi])
        if len(y_test):
            model(x_test)
            layers.update_test(outputs.take(), y_test)
    return layers.compute(), layers


@pytest.fixture(scope="module", params=["mlp", "resnet18"])
def case(request) -> dict:
    model = make_mlp() if request.param == "mlp" else make_resnet()
    shape = (1, 6, 6) if request.param == "mlp" else (3, 16, 16)
    x, y = data(shape, N_TRAIN, 1)
    x_test, y_test = data(shape, N_TEST, 2)
    got, layers = run_layers(model, x, y, x_test, y_test)
    return {"model": model, "x": x, "y": y, "x_test": x_test, "y_test": y_test, "got": got,
            "layers": layers}


def test_block_metrics_equal_an_independent_float64_computation(case):
    model, got = case["model"], case["got"]
    train = own_features(model, case["x"])
    test = own_features(model, case["x_test"])
    assert list(train) == list(case["layers"].blocks)
    for name in train:
        want = block_reference(train[name], case["y"].numpy(), test[name], case["y_test"].numpy(),
                               K)
        for metric in METRICS:
            assert got[layer_key(name, metric)] == pytest.approx(want[metric], rel=RTOL), \
                (name, metric)
    nc1 = [got[layer_key(name, "nc1")] for name in train]
    assert len(set(nc1)) == len(nc1)
    assert 0 < got[layer_key(list(train)[-1], "ncc_acc_test")] <= 1


def test_second_pass_equals_kept_features(case):
    streamed, layers = run_layers(case["model"], case["x"], case["y"], case["x_test"],
                                  case["y_test"], max_feature_bytes=0)
    assert layers.memory_bytes()["kept_features"] == 0
    assert streamed == case["got"]


def test_last_block_is_the_head_input_with_the_head_level_metrics(case):
    model, last = case["model"], case["layers"].blocks[-1]
    with torch.no_grad():
        head_input = model(case["x"]).double().numpy()
    features = own_features(model, case["x"])[last]
    np.testing.assert_allclose(features, head_input, rtol=1e-6, atol=1e-7)
    weight = torch.randn(K, features.shape[1], generator=torch.Generator().manual_seed(5))
    head = nc_metrics(features, case["y"], weight.double())
    for metric in ("nc1", "cdnv", "trace_ratio"):
        assert case["got"][layer_key(last, metric)] == pytest.approx(head[metric], rel=1e-12)


def test_decay_ratio_and_r2_equal_numpy_polyfit(case):
    got = case["got"]
    depths = np.arange(len(case["layers"].blocks), dtype=np.float64)
    logs = np.log10([got[layer_key(n, "nc1")] for n in case["layers"].blocks])
    slope, intercept = np.polyfit(depths, logs, 1)
    residual = logs - (slope * depths + intercept)
    r2 = 1 - residual @ residual / np.square(logs - logs.mean()).sum()
    assert got["layers_decay_ratio"] == pytest.approx(10**slope, rel=1e-12)
    assert got["layers_r2"] == pytest.approx(r2, rel=1e-10, abs=1e-12)


def test_data_separation_fit_edge_cases():
    depths, nc1 = [0, 1, 3, 4], [2.0, 0.5, 0.1, 0.02]
    slope = np.polyfit(depths, np.log10(nc1), 1)[0]
    fit = data_separation_fit(depths, nc1)
    assert fit["layers_decay_ratio"] == pytest.approx(10**slope, rel=1e-12)
    assert 0.9 < fit["layers_r2"] <= 1.0
    assert data_separation_fit([2], [0.3]) == {}
    assert data_separation_fit([], []) == {}
    assert data_separation_fit([0, 1, 2], [0.3, 0.0, 0.1]) == {}
    assert data_separation_fit([0, 1, 2], [0.3, -1.0, 0.1]) == {}
    assert data_separation_fit([0, 1], [0.3, float("nan")]) == {}
    assert data_separation_fit([0, 1, 2], [0.1, 0.1, 0.1]) == {"layers_decay_ratio": 1.0,
                                                                 "layers_r2": 1.0}
    two = data_separation_fit([0, 1], [1.0, 0.01])
    assert two["layers_decay_ratio"] == pytest.approx(0.01) and two["layers_r2"] == 1.0


def test_merge_equals_one_accumulator_over_both(case):
    blocks = named_blocks(case["model"])
    names = [b.name for b in blocks]
    parts = [LayerMetrics(names, K, [b.depth for b in blocks]) for _ in range(2)]
    with torch.no_grad(), capture([(b.name, b.module) for b in blocks]) as outputs:
        for part, (lo, hi) in zip(parts, [(0, 19), (19, N_TRAIN)], strict=True):
            case["model"](case["x"][lo:hi])
            part.update(outputs.take(), case["y"][lo:hi])
        merged = parts[0].merge(parts[1])
        case["model"](case["x_test"])
        merged.update_test(outputs.take(), case["y_test"])
    got = merged.compute()
    assert got.keys() == case["got"].keys()
    for key, value in case["got"].items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_nearest_centre_tallies_merge_by_addition():
    rng = np.random.default_rng(4)
    y = np.arange(60) % K
    h = rng.standard_normal((K, 5))[y] + rng.standard_normal((60, 5))
    stats = ClassStats(K)
    stats.update(h, y)
    one, first, second = (NearestCentreTally(stats.state) for _ in range(3))
    one.update(h, y)
    first.update(h[:25], y[:25])
    second.update(h[25:], y[25:])
    assert torch.equal(first.merge(second).tally, one.tally)
    assert one.tally.tolist() == [round(block_reference(h, y, h, y, K)["ncc_acc_train"] * 60), 60]


def test_capture_removes_its_hooks_and_refuses_a_silent_block():
    model = make_mlp()
    blocks = named_blocks(model)
    with capture([(b.name, b.module) for b in blocks]) as outputs:
        assert all(len(b.module._forward_hooks) == 1 for b in blocks)
        with pytest.raises(RuntimeError, match="produced no output"):
            outputs.take()
    assert all(len(b.module._forward_hooks) == 0 for b in blocks)


def test_block_names_per_architecture():
    assert [b.name for b in named_blocks(make_mlp())] == ["hidden1", "hidden2", "features"]
    assert [b.name for b in named_blocks(make_resnet())] == [
        "stem", "stage1", "stage2", "stage3", "stage4"]
    linear = ResNet((3, 16, 16), feature_dim=10, feature_layer="linear")
    assert [b.name for b in named_blocks(linear)][-1] == "features"
    ufm = UFMFeatures((4,), feature_dim=4, num_classes=K, n_per_class=2)
    assert named_blocks(ufm) == [] and select_blocks(ufm, "all") == []
    assert LayerMetrics([], K).compute() == {}


def test_selection_and_the_one_line_refusal():
    model = make_resnet()
    assert [b.name for b in select_blocks(model, "last")] == ["stage4"]
    chosen = select_blocks(model, ["stage3", "stem"])
    assert [(b.name, b.depth) for b in chosen] == [("stem", 0), ("stage3", 3)]
    assert select_blocks(model, []) == [] and select_blocks(model, None) == []
    assert [b.name for b in select_blocks(make_mlp(), "all")] == ["hidden1", "hidden2",
                                                                   "features"]
    for bad, shown in ((["stage3", "layer9"], "layer9"), ("every", "every"), (3, "3")):
        with pytest.raises(ConfigError) as err:
            select_blocks(model, bad)
        message = str(err.value)
        assert "\n" not in message and message.startswith("nc.layers=")
        assert shown in message and "stem, stage1, stage2, stage3, stage4" in message
    ufm = UFMFeatures((4,), feature_dim=4, num_classes=K, n_per_class=2)
    with pytest.raises(ConfigError, match="no blocks"):
        select_blocks(ufm, ["stem"])


def float64_mlp_problem() -> tuple[nn.Module, tuple, tuple]:
    """The MLP and its data in float64, so a float32 product's dependence on the batch size
    (a shard's batches differ from one process's) stays far below the tolerance."""
    x, y = data((1, 6, 6), N_TRAIN, 1)
    x_test, y_test = data((1, 6, 6), N_TEST, 2)
    return make_mlp().double(), (x.double(), y), (x_test.double(), y_test)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: its shard of the MLP's train data (rank 0 without class K-1; rank 1 keeps no
    features, so every rank runs the second pass) and of the test data (all on rank 0);
    results to out_dir/rank<r>.json."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    model, (x, y), (x_test, y_test) = float64_mlp_problem()
    mine = (torch.arange(N_TRAIN) < 30) & (y != K - 1)
    mine = mine if rank == 0 else ~mine
    test_mine = torch.full((N_TEST,), rank == 0)
    metrics, layers = run_layers(model, x[mine], y[mine], x_test[test_mine],
                                 y_test[test_mine], max_feature_bytes=0 if rank == 1 else 2**30)
    out = {"metrics": metrics, "kept": layers.memory_bytes()["kept_features"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    run_two_ranks(__file__, tmp_path, WORKER_TIMEOUT_S)
    model, (x, y), (x_test, y_test) = float64_mlp_problem()
    want, _ = run_layers(model, x, y, x_test, y_test)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["kept"] == 0
        assert out["metrics"].keys() == want.keys()
        for key, value in want.items():
            assert out["metrics"][key] == pytest.approx(value, rel=1e-10, abs=1e-13), key


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
