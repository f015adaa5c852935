"""The ETF head's geometry, the learned head, and the MLP's feature dimension."""

from __future__ import annotations

import pytest
import torch

from ncsweep.config import ConfigError
from ncsweep.heads import ETFHead, LearnedHead, simplex_etf
from ncsweep.models import MLP, Network
from ncsweep.training import count_parameters


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("extra", [-1, 0, 1, 7])
@pytest.mark.parametrize("embedding", ["random", "coordinate"])
def test_simplex_etf_geometry(k: int, extra: int, embedding: str) -> None:
    d = k + extra
    w = simplex_etf(k, d, embedding, seed=3, dtype=torch.float64)
    assert w.shape == (k, d)
    gram = w @ w.T
    expected = (k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
    torch.testing.assert_close(gram, expected, atol=1e-12, rtol=0)
    if d == k - 1:
        assert torch.linalg.matrix_rank(w) == d  # spans all of R^d


def test_etf_embedding_is_seeded_and_coordinate_is_fixed() -> None:
    a, b = simplex_etf(5, 9, "random", seed=1), simplex_etf(5, 9, "random", seed=1)
    c = simplex_etf(5, 9, "random", seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    coord = simplex_etf(5, 9, "coordinate")
    assert torch.count_nonzero(coord[:, 5:]) == 0


@pytest.mark.parametrize(("k", "d"), [(10, 10), (10, 512), (3, 7)])
def test_coordinate_etf_is_zhu_2021s_classifier(k: int, d: int) -> None:
    """Zhu et al.'s models/resnet.py: sqrt(K/(K-1)) (I - 11^T/K), unit rows, times eye(K, d)."""
    frame = torch.sqrt(torch.tensor(k / (k - 1), dtype=torch.float64)) * (
        torch.eye(k, dtype=torch.float64) - torch.ones(k, k, dtype=torch.float64) / k)
    frame = frame / torch.sqrt((frame**2).sum() / k)
    zhu = frame @ torch.eye(k, d, dtype=torch.float64)
    ours = simplex_etf(k, d, "coordinate", dtype=torch.float64)
    torch.testing.assert_close(ours, zhu, atol=1e-15, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(k, dtype=torch.float64))
    torch.testing.assert_close(ours @ ours.T, zhu @ zhu.T, atol=1e-15, rtol=0)
    torch.testing.assert_close(ours[:, :k], frame, atol=1e-15, rtol=0)
    assert torch.count_nonzero(ours[:, k:]) == 0
    assert torch.equal(ETFHead(k, d).weight.detach(), ours.float())  # the default embedding


def test_etf_rejects_small_dim_and_bad_embedding() -> None:
    with pytest.raises(ConfigError, match=r"d >= K-1 = 9"):
        simplex_etf(10, 8)
    with pytest.raises(ConfigError, match=r"head\.embedding='qr'"):
        simplex_etf(10, 10, "qr")


def test_etf_head_is_frozen_but_counted_and_bias_trains() -> None:
    head = ETFHead(10, 12, bias=True)
    assert not head.weight.requires_grad and head.bias.requires_grad
    net = Network(MLP((64,), 12, width=32, depth=1), head)
    total, trainable = count_parameters(net)
    assert total - trainable == 10 * 12
    x = torch.randn(4, 64)
    net(x).sum().backward()
    assert head.weight.grad is None and head.bias.grad is not None
    no_bias = ETFHead(10, 12, bias=False)
    assert no_bias.bias is None


def test_learned_head_and_mlp_feature_dim() -> None:
    net = Network(MLP((8, 8), 7, width=16, depth=2), LearnedHead(10, 7, bias=False))
    features, logits = net.features_and_logits(torch.randn(5, 8, 8))
    assert features.shape == (5, 7) and logits.shape == (5, 10)
    assert net.head.bias is None
    torch.testing.assert_close(logits, features @ net.head.weight.T)
    with pytest.raises(ConfigError, match=r"arch\.activation='swish'"):
        MLP((4,), 3, activation="swish")
