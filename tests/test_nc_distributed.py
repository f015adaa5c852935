"""NC metrics across ranks and accumulators, in tiles, and nc4's float32 decisions.

The distributed tests start real processes (gloo on 127.0.0.1); this file is also their worker:
``python tests/test_nc_distributed.py <rank> <world> <port> <out_dir>``.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from ncsweep import distributed
from ncsweep.nc import COMPUTE_KEYS, HeldOutNC4, NCAccumulator, decisions, nc_metrics
from tests.support import block_reference, run_two_ranks

K, D = 6, 9
WORKER_TIMEOUT_S = 120


def problem(seed: int = 0) -> dict[str, np.ndarray]:
    """Train and test features, a full-rank and a rank-deficient classifier, and the shards:
    rank 0 gets most samples of the first 450 but none of class K-1, rank 1 the rest."""
    rng = np.random.default_rng(seed)
    n = 700
    y = np.concatenate([np.arange(K), rng.integers(0, K, n - K)])
    h = (3.0 * rng.standard_normal((K, D)))[y] + rng.standard_normal((n, D))
    h_test = 2.0 * rng.standard_normal((333, D)) + h.mean(axis=0)
    w = rng.standard_normal((K, D))
    w_low = rng.standard_normal((K, 4)) @ rng.standard_normal((4, D))
    shard0 = (np.arange(n) < 450) & (y != K - 1)
    return {"h": h, "y": y, "h_test": h_test, "w": w, "b": rng.standard_normal(K),
            "w_low": w_low, "shard0": shard0, "test0": np.arange(333) < 120,
            "y_test": rng.integers(0, K, 333)}


def split(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(np.arange(n), np.sort(rng.choice(np.arange(1, n), 3, replace=False)))


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: its shard through every reduced path; results to out_dir/rank<r>.json."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    p = problem()
    mine = p["shard0"] if rank == 0 else ~p["shard0"]
    h, y = p["h"][mine], p["y"][mine]
    rng = np.random.default_rng(rank)
    kept = NCAccumulator(K)
    streamed = NCAccumulator(K, max_feature_bytes=0 if rank == 1 else 2**30)
    lonely = NCAccumulator(K)
    for idx in split(len(y), rng):
        kept.update(h[idx], y[idx])
        streamed.update(torch.from_numpy(h[idx]).float(), torch.from_numpy(y[idx]))
    if rank == 0:
        lonely.update(p["h"], p["y"])
    out: dict[str, object] = {"needs_before": streamed.needs_second_pass}
    for acc in (kept, streamed, lonely):
        acc.all_reduce()
    out["needs_after"] = streamed.needs_second_pass
    for idx in split(len(y), rng):
        streamed.update_predictions(h[idx], y[idx], p["w_low"], p["b"])
    out["kept"] = kept.compute(p["w"], p["b"])
    out["streamed"] = streamed.compute(p["w_low"], p["b"])
    out["ncc"] = [kept.nearest_centre_accuracy(), streamed.nearest_centre_accuracy()]
    out["lonely"] = lonely.compute(p["w"], p["b"])
    test_mine = p["test0"] if rank == 0 else ~p["test0"]
    heldout = HeldOutNC4(kept, p["w"], p["b"])
    heldout.update(p["h_test"][test_mine], p["y_test"][test_mine])
    out["nc4_test"] = heldout.compute()
    out["ncc_test"] = heldout.nearest_centre_accuracy()
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()



@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    run_two_ranks(__file__, out, WORKER_TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_equal_metrics(got: dict, want: dict, rtol: float = 1e-10) -> None:
    for key in COMPUTE_KEYS:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-13), key


def test_two_ranks_equal_one_process(two_ranks):
    p = problem()
    for out in two_ranks:
        assert_equal_metrics(out["kept"], nc_metrics(p["h"], p["y"], p["w"], p["b"]))
        h32 = torch.from_numpy(p["h"]).float()
        assert_equal_metrics(out["streamed"], nc_metrics(h32, p["y"], p["w_low"], p["b"]))
        assert out["streamed"]["nc4_rowspace"] != out["streamed"]["nc4"]
        assert_equal_metrics(out["lonely"], nc_metrics(p["h"], p["y"], p["w"], p["b"]))
        train = NCAccumulator(K)
        train.update(p["h"], p["y"])
        heldout = HeldOutNC4(train, p["w"], p["b"])
        heldout.update(p["h_test"])
        assert out["nc4_test"] == heldout.compute()
        want = block_reference(p["h"], p["y"], p["h_test"], p["y_test"], K)
        want32 = block_reference(h32.double().numpy(), p["y"], p["h_test"], p["y_test"], K)
        assert out["ncc"] == [want["ncc_acc_train"], want32["ncc_acc_train"]]
        assert out["ncc_test"] == want["ncc_acc_test"]
        assert out["sum"] == 3.0
    assert two_ranks[0]["needs_before"] is False and two_ranks[1]["needs_before"] is True
    assert all(out["needs_after"] for out in two_ranks)


def test_all_reduce_outside_a_distributed_run_is_a_no_op():
    p = problem()
    acc = NCAccumulator(K)
    acc.update(p["h"], p["y"])
    acc.all_reduce()
    assert_equal_metrics(acc.compute(p["w"], p["b"]), nc_metrics(p["h"], p["y"], p["w"], p["b"]),
                         rtol=0.0)
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def test_merge_equals_one_accumulator_over_both():
    p = problem()
    first, second = p["shard0"], ~p["shard0"]
    a, b = NCAccumulator(K), NCAccumulator(K)
    a.update(p["h"][first], p["y"][first])
    b.update(p["h"][second], p["y"][second])
    merged = a.merge(b)
    want = nc_metrics(p["h"], p["y"], p["w"], p["b"])
    assert_equal_metrics(merged.compute(p["w"], p["b"]), want)
    assert_equal_metrics(b.merge(a).compute(p["w"], p["b"]), want)
    with pytest.raises(ValueError, match="class 5 has no samples"):
        a.compute(p["w"], p["b"])
    small = NCAccumulator(K, max_feature_bytes=1000).merge(a).merge(b)
    assert small.needs_second_pass and not merged.needs_second_pass
    for part in (second, first):
        small.update_predictions(p["h"][part], p["y"][part], p["w"], p["b"])
    assert_equal_metrics(small.compute(p["w"], p["b"]), want)
    with pytest.raises(ValueError, match="merge pass-1 state only"):
        small.merge(b)

    heldout = [HeldOutNC4(merged, p["w"], p["b"]) for _ in range(2)]
    heldout[0].update(p["h_test"][:100])
    heldout[1].update(p["h_test"][100:])
    whole = HeldOutNC4(merged, p["w"], p["b"])
    whole.update(p["h_test"])
    assert heldout[0].merge(heldout[1]).compute() == whole.compute()
    with pytest.raises(ValueError, match="same classifier"):
        heldout[0].merge(HeldOutNC4(merged, 2.0 * p["w"], p["b"]))


@pytest.mark.parametrize("rank", [None, 30])
def test_tiled_metrics_equal_untiled_at_k_500(rank):
    rng = np.random.default_rng(7)
    k, d, n = 500, 40, 3000
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    h = (2.0 * rng.standard_normal((k, d)))[y] + rng.standard_normal((n, d))
    w = rng.standard_normal((k, d)) if rank is None else (
        rng.standard_normal((k, rank)) @ rng.standard_normal((rank, d)))
    b = rng.standard_normal(k)
    untiled = nc_metrics(h, y, w, b, tile_size=k)
    tiled = nc_metrics(h, y, w, b, tile_size=37)
    assert_equal_metrics(tiled, untiled)
    assert (untiled["nc1_rowspace"] == untiled["nc1"]) == (rank is None)
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        nc_metrics(h, y, w, b, tile_size=0)


def logit_near_ties(n_per_class: int = 400, seed: int = 3) -> tuple[np.ndarray, ...]:
    """Class k sits at s W^+ (e_k + e_{k+1}); each sample is moved along W^+ (e_k - e_{k+1}) so
    that its float64 logits k and k+1 differ by 1e-10 of their size: far below float32's
    rounding, far above float64's. Nearest centre and float64 argmax are both k."""
    rng = np.random.default_rng(seed)
    k, d = 4, 32
    w = rng.standard_normal((k, d))
    pinv = np.linalg.pinv(w)
    eye = np.eye(k)
    h, y = [], []
    for c in range(k):
        other = (c + 1) % k
        x = 10.0 * pinv @ (eye[c] + eye[other]) + 1e-3 * rng.standard_normal((n_per_class, d))
        move = pinv @ (eye[c] - eye[other]) / 2.0
        z = x @ w.T
        delta = 1e-10 * np.abs(z[:, c])
        x += (delta - (z[:, c] - z[:, other]))[:, None] * move
        h.append(x)
        y.append(np.full(n_per_class, c))
    h, y = np.concatenate(h), np.concatenate(y)
    z = h @ w.T
    top = np.sort(z, axis=1)
    assert (z.argmax(axis=1) == y).all() and ((top[:, -1] - top[:, -2]) > 0).all()
    return h, y, w


def float64_nc4(h, y, w, b, centres) -> float:
    """Straight float64 nc4: argmax W h + b against argmin ||h - mu_k||."""
    nearest = ((h[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
    return float(np.mean((h @ w.T + b).argmax(axis=1) != nearest))


def float32_nc4(h, w, b, centres) -> float:
    """nc4 from float32 scores without any re-check."""
    h32, c32 = torch.from_numpy(h).float(), torch.from_numpy(centres).float()
    logits = h32 @ torch.from_numpy(w).float().T + torch.from_numpy(b).float()
    nearest = torch.cdist(h32, c32).argmin(dim=1)
    return float((logits.argmax(dim=1) != nearest).double().mean())


@pytest.fixture
def float32_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decide in float32 (with the float64 re-check) at any K, not only K >= 256."""
    monkeypatch.setattr(decisions, "FLOAT32_MIN_CLASSES", 0)


def test_nc4_with_float32_decisions_equals_float64_on_logit_near_ties(float32_decisions):
    h, y, w = logit_near_ties()
    b = np.zeros(w.shape[0])
    centres = np.stack([h[y == c].mean(axis=0) for c in range(w.shape[0])])
    want = float64_nc4(h, y, w, b, centres)
    assert want == 0.0
    assert float32_nc4(h, w, b, centres) > 0.05
    assert nc_metrics(h, y, w, b)["nc4"] == want
    acc = NCAccumulator(w.shape[0], max_feature_bytes=0, tile_size=3)
    acc.update(h, y)
    acc.update_predictions(h, y, w, b)
    assert acc.compute(w, b)["nc4"] == want


def test_nc4_test_with_float32_decisions_equals_float64_on_centre_near_ties(float32_decisions):
    rng = np.random.default_rng(4)
    k, d = 5, 24
    h_train = (10.0 * rng.standard_normal((k, d)))[np.repeat(np.arange(k), 40)]
    h_train += rng.standard_normal(h_train.shape)
    y = np.repeat(np.arange(k), 40)
    train = NCAccumulator(k)
    train.update(h_train, y)
    centres = np.stack([h_train[y == c].mean(axis=0) for c in range(k)])
    gap = centres[0] - centres[1]
    unit = gap / np.linalg.norm(gap)
    perp = rng.standard_normal((2000, d))
    perp -= (perp @ unit)[:, None] * unit
    h_test = (centres[0] + centres[1]) / 2.0 + 0.5 * perp + 1e-9 * unit
    w, b = 0.01 * rng.standard_normal((k, d)), np.array([100.0, 0, 0, 0, 0])
    sq = ((h_test[:, None, :] - centres[None]) ** 2).sum(axis=2)
    assert (sq.argmin(axis=1) == 0).all()
    assert (np.sort(sq, axis=1)[:, 1] == sq[:, 1]).all()
    want = float64_nc4(h_test, None, w, b, centres)
    assert want == 0.0
    assert float32_nc4(h_test, w, b, centres) > 0.05
    heldout = HeldOutNC4(train, w, b)
    heldout.update(h_test)
    assert heldout.compute() == want
    labelled = HeldOutNC4(train, w, b)
    labelled.update(h_test, np.zeros(len(h_test), dtype=np.int64))
    labelled.compute()
    assert labelled.nearest_centre_accuracy() == 1.0


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
