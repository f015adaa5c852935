"""The data package: shared config bases, one error type for bad options, torchvision readers."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ncsweep.config import ConfigError, check_overrides, group_options
from ncsweep.data import DatasetNotFound, batches, load_digits, member_batches
from ncsweep.data.files import LAYOUTS, read_small
from ncsweep.data.tabular import digits_arrays, stratified_split
from tests.support import (
    CONF,
    K,
    compose_cfg,
    load,
    pattern_images,
    run_cli,
    write_cifar10,
    write_mnist,
)

IMAGE_SETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet"]
RESNETS = ["resnet18", "resnet34", "resnet50"]


# ------------------------------------------------------------------------ shared config bases

def _own_keys(path: Path) -> dict:
    return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}


@pytest.mark.parametrize("group,choices,base", [("dataset", IMAGE_SETS, "base/image"),
                                                ("arch", RESNETS, "base/resnet")])
def test_choices_hold_only_what_differs_from_their_base(group: str, choices: list[str],
                                                        base: str) -> None:
    base_keys = _own_keys(CONF / group / f"{base}.yaml")
    for choice in choices:
        path = CONF / group / f"{choice}.yaml"
        assert yaml.safe_load(path.read_text())["defaults"] == [f"{base}@_here_", "_self_"]
        repeated = {k for k, v in _own_keys(path).items() if base_keys.get(k) == v}
        assert not repeated, f"{path.name} repeats its base: {sorted(repeated)}"
        node = OmegaConf.to_container(compose_cfg([f"{group}={choice}"])[group])
        assert set(base_keys) <= set(node)


def test_every_image_set_declares_its_normalisation() -> None:
    for name in IMAGE_SETS:
        node = compose_cfg([f"dataset={name}"]).dataset
        assert node._target_ == "ncsweep.data.load_images"
        assert len(node.mean) == len(node.std) >= 1 and node.format and node.name == name


def test_bases_are_not_choices(tmp_path: Path) -> None:
    group = tmp_path / "conf" / "dataset"
    (group / "base").mkdir(parents=True)
    for name in ("a.yaml", "_shared.yaml", "base/image.yaml"):
        (group / name).write_text("x: 1\n")
    assert group_options(group) == ["a"]
    assert "base" not in group_options(CONF / "dataset")
    assert group_options(CONF / "arch") == ["mlp", "resnet18", "resnet34", "resnet50", "ufm",
                                            "vgg11_bn"]
    for bad in ("_shared", "base", "base/image"):
        with pytest.raises(ConfigError, match=rf"^dataset='{bad}' is not allowed: one of a$"):
            check_overrides([f"dataset={bad}"], tmp_path / "conf")


@pytest.mark.parametrize("override", ["dataset=base", "dataset=base/image", "dataset=_image",
                                      "arch=base/resnet", "dataset=cifar10,base/image"])
def test_the_cli_refuses_a_base_in_one_line(tmp_path: Path, override: str) -> None:
    result = run_cli([override, "logger=none"], tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    group, _, value = override.partition("=")
    bad = value.split(",")[-1]
    assert lines[0].startswith(f"ncsweep: error: {group}='{bad}' is not allowed: one of ")
    assert "base" not in lines[0].partition("one of ")[2]
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------- one error type for options

def _idx_gz(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    header = ((type_code << 8) | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root)
    return root


@pytest.mark.parametrize("overrides,key", [
    (["dataset.format=png"], "dataset.format"),
    (["~dataset.mean"], "dataset.mean"),
    (["dataset.std=null"], "dataset.std"),
    (["dataset.std=[0.3,0.3]"], "dataset.std"),
    (["dataset.channels=2"], "dataset.channels"),
    (["dataset.input_shape=[3,30,30]"], "dataset.input_shape"),
    (["dataset.imbalance=zipf"], "dataset.imbalance"),
    (["dataset.imbalance=exp", "dataset.imbalance_ratio=0.5"], "dataset.imbalance_ratio"),
    (["dataset.imbalance=step", "dataset.imbalance_minority_fraction=1"],
     "dataset.imbalance_minority_fraction"),
    (["dataset.label_noise=pair", "dataset.label_noise_rate=2"], "dataset.label_noise_rate"),
    (["dataset.label_noise=pair", "dataset.random_labels=true"], "dataset.label_noise"),
    (["dataset.classes=[1,1]", "dataset.num_classes=2"], "dataset.classes"),
    (["dataset.classes=[0,10]", "dataset.num_classes=2"], "dataset.classes"),
    (["dataset.samples_per_class=11"], "dataset.samples_per_class"),
    (["dataset.test_samples_per_class=4"], "dataset.test_samples_per_class"),
    (["dataset.num_classes=9"], "dataset.num_classes"),
])
def test_a_bad_data_option_is_a_config_error(mnist_root: Path, overrides: list[str],
                                             key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(["dataset=mnist", f"dataset.root={mnist_root}", *overrides])
    message = str(err.value)
    assert err.value.key == key and message.startswith(f"{key}=") and "\n" not in message
    assert " is not allowed: " in message


def test_tabular_sets_check_their_options_too() -> None:
    with pytest.raises(ConfigError, match=r"^dataset\.input_shape=\[4, 4\] is not allowed: one"):
        load(["dataset=synthetic", "dataset.input_shape=[4,4]"])
    with pytest.raises(ConfigError, match=r"^dataset\.input_shape=\[32\] is not allowed: \[64\]"):
        load(["dataset.input_shape=[32]"])


@pytest.mark.parametrize("fraction,seed", [(0.2, 0), (0.3, 7), (0.013, 1), (0.77, 123)])
def test_digits_and_their_split_are_scikit_learns(fraction: float, seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = digits_arrays()
    sk_x, sk_y = load_digits(return_X_y=True)
    assert np.array_equal(x, sk_x) and np.array_equal(y, sk_y) and x.dtype == sk_x.dtype
    rows = np.arange(len(y))
    expected = train_test_split(rows, test_size=fraction, random_state=seed, stratify=y)
    assert all(np.array_equal(a, b) for a, b in
               zip(stratified_split(y, fraction, seed), expected, strict=True))
    rng = np.random.default_rng(seed)  # unequal classes, where ties in the remainders are drawn
    labels = np.concatenate([rng.integers(0, 7, 1000), np.arange(7), np.arange(7)])
    expected = train_test_split(np.arange(len(labels)), test_size=fraction,
                                random_state=seed, stratify=labels)
    assert all(np.array_equal(a, b) for a, b in
               zip(stratified_split(labels, fraction, seed), expected, strict=True))


@pytest.mark.parametrize("batch_size", [256, 1000, None])
def test_member_batches_are_each_members_own_batches_stacked(batch_size: int | None) -> None:
    """The ensemble's one gather equals every member's solo batches, epoch after epoch."""
    split = load_digits().train
    solo = [torch.Generator().manual_seed(s) for s in (0, 1, 5)]
    stacked = [torch.Generator().manual_seed(s) for s in (0, 1, 5)]
    for _ in range(2):
        streams = [list(batches(split, batch_size, g, augment=True)) for g in solo]
        together = list(member_batches(split, batch_size, stacked, augment=True))
        assert len(together) == len(streams[0]) == -(-len(split) // (batch_size or len(split)))
        for index, (x, y) in enumerate(together):
            assert x.shape == (3, *streams[0][index][0].shape)
            for r, stream in enumerate(streams):
                assert torch.equal(x[r], stream[index][0]) and torch.equal(y[r], stream[index][1])
    assert all(torch.equal(a.get_state(), b.get_state())
               for a, b in zip(solo, stacked, strict=True))


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001, 1.5])
def test_a_digits_split_that_leaves_a_class_out_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match=rf"^dataset\.test_fraction={fraction} is not allowed"):
        load([f"dataset.test_fraction={fraction}"])


def test_a_corrupt_file_is_not_a_config_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(K, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _idx_gz(raw / f"{prefix}-images-idx3-ubyte.gz", np.zeros((K, 28, 28), np.uint8), 0x0D)
        _idx_gz(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes") as err:
        load(["dataset=mnist", f"dataset.root={tmp_path}"])
    assert not isinstance(err.value, ConfigError)


# ------------------------------------------------------------------ torchvision's own readers

def test_mnist_is_read_by_torchvision_and_from_gz_alike(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    write_mnist(tmp_path / "plain")
    write_mnist(tmp_path / "gz", gz=True)
    reference = MNIST(str(tmp_path / "plain"), train=True, download=False)
    for root in ("plain", "gz"):
        x, y, test_xy, k = read_small("mnist", tmp_path / root, download=False, test=True)
        assert torch.equal(x[:, 0], reference.data) and torch.equal(y, reference.targets)
        assert x.dtype == torch.uint8 and x.is_contiguous() and k == K
        assert test_xy is not None and test_xy[0].shape == (3 * K, 1, 28, 28)
    assert not list((tmp_path / "gz" / "MNIST" / "raw").glob("*-ubyte"))  # nothing extracted


def test_only_the_needed_files_are_required(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path)
    for f in raw.glob("t10k-*"):
        f.unlink()
    x, _, test_xy, _ = read_small("mnist", tmp_path, download=False, test=False)
    assert test_xy is None and len(x) == 10 * K
    with pytest.raises(DatasetNotFound, match="missing t10k-images-idx3-ubyte"):
        read_small("mnist", tmp_path, download=False, test=True)


def test_cifar_fixtures_are_read_though_their_checksums_differ(tmp_path: Path) -> None:
    from torchvision.datasets import CIFAR10

    folder = write_cifar10(tmp_path, per_class_per_batch=2)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(tmp_path), train=True, download=False)  # md5 of the published files
    x, y, test_xy, k = read_small("cifar10", tmp_path, download=False, test=True)
    entries = [pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    expected = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(expected)) and x.is_contiguous() and k == K
    assert y.tolist() == [label for e in entries for label in e["labels"]]
    assert test_xy is not None and len(test_xy[1]) == 2 * K


def test_svhn_and_stl10_fixtures(tmp_path: Path) -> None:
    from scipy.io import savemat

    labels = np.tile(np.arange(K), 3)
    images = pattern_images(labels, 3, 32, 2)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "train_32x32.mat",
            {"X": images.transpose(2, 3, 1, 0), "y": np.where(labels == 0, 10, labels)[:, None]})
    x, y, test_xy, k = read_small("svhn", tmp_path, download=False, test=False)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels.tolist()
    assert test_xy is None and k == K

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    big = pattern_images(labels, 3, 96, 3)
    big.transpose(0, 1, 3, 2).tofile(stl / "train_X.bin")
    (labels + 1).astype(np.uint8).tofile(stl / "train_y.bin")
    x, y, _, _ = read_small("stl10", tmp_path, download=False, test=False)  # no unlabeled_X.bin
    assert torch.equal(x, torch.from_numpy(big)) and x.is_contiguous()
    assert y.tolist() == labels.tolist()


@pytest.mark.parametrize("format", sorted(LAYOUTS))
def test_every_missing_small_set_names_folder_and_switch(tmp_path: Path, format: str) -> None:
    with pytest.raises(DatasetNotFound) as err:
        read_small(format, tmp_path / "nowhere", download=False, test=True)
    message = str(err.value)
    assert str(LAYOUTS[format].folder(tmp_path / "nowhere")) in message
    assert "dataset.download=true" in message and "\n" not in message
    assert not (tmp_path / "nowhere").exists()
