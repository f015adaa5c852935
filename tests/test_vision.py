"""Image data sets read from torchvision's file formats, image backbones at any d, presets.

Everything runs on the CPU with tiny files written here and tiny batches; the one GPU test
skips without CUDA.
"""

from __future__ import annotations

import itertools
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ncsweep import data as D
from ncsweep.config import ConfigError, validate
from ncsweep.models import MLP, ResNet, WeightsNotFound
from ncsweep.training import count_parameters
from tests.support import (
    CONF,
    FAST,
    K,
    compose_cfg,
    load,
    pattern_images,
    run_cli,
    write_cifar10,
    write_mnist,
)

PRESETS = ["zhu2021_cifar10_resnet18", "zhu2021_mnist_resnet18", "zhu2021_mlp",
           "zhou2022_mse_dims", "papyan2020_cifar10"]
ARCHS = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "mlp"]
DATASETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet"]
# docs/metrics.md: torchvision ResNets with K = 10, a learned Linear(d, 10) classifier.
PUBLISHED = {("resnet18", 512): 11_181_642, ("resnet18", 10): 8_867_542,
             ("resnet50", 2048): 23_528_522, ("resnet50", 10): 22_481_110}


# ------------------------------------------------------------------ files in torchvision formats

def write_image_folder(root: Path, classes: int = 3, per_class: int = 4, side: int = 12) -> Path:
    from PIL import Image

    top = root / "imagenet"
    rng = np.random.default_rng(0)
    for part, n in (("train", per_class), ("val", 2)):
        for k in range(classes):
            folder = top / part / f"n{k:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return top


# ------------------------------------------------------------------------------------ presets

# What each preset's cited code runs (the comment block atop each preset gives file and line):
# batch, lr, weight decay, augmentation, stem, epochs, LR milestones. SGD with momentum 0.9.
PUBLISHED_SETUPS = {
    "zhu2021_cifar10_resnet18": (128, 0.05, 5e-4, True, "cifar", 200, [40, 80, 120, 160]),
    "zhu2021_mnist_resnet18": (128, 0.05, 5e-4, False, "cifar", 200, [40, 80, 120, 160]),
    "zhu2021_mlp": (64, 0.01, 1e-4, False, None, 200, [40, 80, 120, 160]),
    # their nn.MSELoss is K/2 times smaller than ncsweep's mse: lr 0.05, wd 5e-4 there
    "zhou2022_mse_dims": (128, 0.01, 2.5e-3, True, "cifar", 200, [40, 80, 120, 160]),
    "papyan2020_cifar10": (128, 0.05, 5e-4, False, "imagenet", 350, [0.333333, 0.666667]),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_to_its_published_setup(preset: str) -> None:
    assert (CONF / "experiment" / f"{preset}.yaml").read_text().startswith("# @package _global_")
    plain = validate(compose_cfg([f"experiment={preset}"]))
    batch, lr, decay, augment, stem, epochs, milestones = PUBLISHED_SETUPS[preset]
    assert plain["trainer"]["batch_size"] == batch
    assert plain["optim"]["_target_"] == "torch.optim.SGD"
    assert (plain["optim"]["lr"], plain["optim"]["momentum"]) == (lr, 0.9)
    assert plain["optim"]["weight_decay"] == decay
    assert plain["dataset"]["augment"] is augment
    assert plain["arch"].get("stem") == stem
    assert plain["trainer"]["epochs"] == epochs
    assert plain["schedule"]["milestones"] == milestones
    # the design card: the command line picks head and dim over the preset's; the ETF is
    # the papers' own (frame on the first K coordinates)
    etf = validate(compose_cfg([f"experiment={preset}", "head=etf", "dim=K"]))
    assert etf["head"]["_target_"].endswith("ETFHead") and etf["feature_dim"] == K
    assert etf["head"]["embedding"] == "coordinate"


def test_zhou2022_sweeps_the_published_dims_with_mse() -> None:
    cfg = compose_cfg(["experiment=zhou2022_mse_dims"])
    assert cfg.hydra.sweeper.params.dim == "5,8,9,10,512"
    assert validate(cfg)["loss"]["_target_"].endswith("HalfSquaredError")
    for d in (5, 8, 9, 10, 512):
        assert validate(compose_cfg(["experiment=zhou2022_mse_dims", f"dim={d}"]))[
            "feature_dim"] == d


# ------------------------------------------------------------------------ models at any d

def _build(arch: str, dim: str, input_shape=(3, 32, 32), extra: list[str] = ()):
    cfg = compose_cfg([f"arch={arch}", f"dim={dim}", *extra])
    plain = validate(cfg)
    d = plain["feature_dim"]
    from ncsweep.models import Network

    backbone = instantiate(cfg.arch, input_shape=input_shape, feature_dim=d)
    head = instantiate(cfg.head, num_classes=K, feature_dim=d)
    return Network(backbone, head), d


def _resnet18_formula(d: int) -> int:
    """ResNet18, K = 10, last block narrowed to d: counted from the layer shapes."""
    wide = 11_181_642 - (512 * 512 * 9 + 2 * 512) - (512 * 10 + 10)
    return wide + (512 * 9 * d + 2 * d) + (512 * d + 2 * d) + (d * 10 + 10)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dim", ["K", "K-1", "512"])
def test_every_architecture_trains_at_any_feature_dim(arch: str, dim: str) -> None:
    torch.manual_seed(0)
    net, d = _build(arch, dim)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    features, logits = net.features_and_logits(x)
    assert features.shape == (2, d) and logits.shape == (2, K)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    total, _ = count_parameters(net)
    if arch == "resnet18" and d != 512:
        assert total == _resnet18_formula(d)
    if (arch, d) in PUBLISHED:
        assert total == PUBLISHED[(arch, d)]


def test_resnet50_matches_nc_metrics_at_its_native_width() -> None:
    net, d = _build("resnet50", "2048")
    assert d == 2048 and count_parameters(net)[0] == PUBLISHED[("resnet50", 2048)]
    assert net.backbone.layer4[-1].downsample is None  # torchvision's own block


def test_linear_feature_layer_and_cifar_stem() -> None:
    net, d = _build("resnet18", "K", extra=["arch.feature_layer=linear", "arch.stem=cifar"])
    b = net.backbone
    assert b.proj.in_features == 512 and b.proj.out_features == d == K
    assert b.layer4[-1].conv2.out_channels == 512  # the block keeps its width
    assert b.conv1.kernel_size == (3, 3) and b.conv1.stride == (1, 1)
    assert isinstance(b.maxpool, torch.nn.Identity)
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, K)


def test_image_backbones_reject_flat_inputs() -> None:
    with pytest.raises(ConfigError, match=r"input_shape=\[64\] is not allowed: \[C, H, W\]"):
        ResNet((64,), 10)


def test_pretrained_weights_load_strictly_or_where_shapes_match(tmp_path: Path,
                                                                monkeypatch) -> None:
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=1000)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    name = "ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(WeightsNotFound, match=r"resnet18-f37072fd\.pth; ncsweep never downloads"):
        ResNet((3, 32, 32), 10, weights=name)
    torch.save(source.state_dict(), hub / "checkpoints" / "resnet18-f37072fd.pth")
    # d = 10 narrows the last block: a strict load is refused, naming what matched
    with pytest.raises(ConfigError, match=r"arch.weights='ResNet18_Weights.IMAGENET1K_V1' is "
                       r"not allowed: .* 115 of 126 tensors match \(shape differs: layer4.1.bn2"):
        ResNet((3, 32, 32), 10, weights=name)
    net = ResNet((3, 32, 32), 10, weights=name, weights_strict=False,
                 freeze="all_but_last_block")
    record = net.transfer_record
    assert record["weights_loaded"] == 115 and record["freeze"] == "all_but_last_block"
    assert "layer4.1.conv2.weight" in record["weights_reshaped"]
    assert "layer4.1.downsample.0.weight" in record["weights_missing"]
    assert record["weights_unexpected"] == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layer4.1.") for n in trainable)
    net.train()
    assert not net.bn1.training and net.layer4[1].bn2.training  # frozen BN keeps its stats
    with pytest.raises(WeightsNotFound, match="no such file"):
        ResNet((3, 32, 32), 10, weights=str(tmp_path / "nothing.pth"))
    # ncsweep's own checkpoint layout (backbone. and head. prefixes) loads strictly
    torch.save({"model": {**{f"backbone.{k}": v for k, v in net.state_dict().items()},
                          "head.weight": torch.zeros(10, 10)}}, tmp_path / "ckpt.pt")
    again = ResNet((3, 32, 32), 10, weights=str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(again.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    assert again.transfer_record["weights_loaded"] == len(again.state_dict())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_run_on_the_cpu(amp: str) -> None:
    net, _ = _build("resnet18", "K", extra=[f"arch.amp={amp}", "arch.channels_last=true"])
    assert net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    features, logits = net.features_and_logits(torch.randn(2, 3, 32, 32))
    assert features.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.sum().backward()
    assert net.backbone.conv1.weight.grad.dtype == torch.float32


def test_compile_runs_on_a_tiny_model() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler (cc/gcc), none on PATH")
    torch.manual_seed(0)
    eager = MLP((3, 4, 4), 4, width=8, depth=1)
    compiled = MLP((3, 4, 4), 4, width=8, depth=1, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(4, 3, 4, 4)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- reading the files

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_resized_to_three_channels(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    bundle = load(["dataset=mnist", f"dataset.root={tmp_path}"])
    assert bundle.input_shape == (3, 32, 32) and len(bundle.train) == 100
    assert len(bundle.test) == 30 and bundle.train.inputs.dtype == torch.uint8
    assert bundle.train.inputs.shape == (100, 1, 32, 32)  # stored once, one channel
    x, y = next(D.batches(bundle.train, 8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], x[:, 2])
    raw = bundle.train.inputs[:8].float() / 255
    torch.testing.assert_close(x[:, :1], (raw - 0.1307) / 0.3081)
    assert y.tolist() == list(range(8))
    native = load(["dataset=mnist", f"dataset.root={tmp_path}", "dataset.size=28",
                   "dataset.channels=1"])
    assert native.input_shape == (1, 28, 28)


def test_cifar10_pickles(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_class_per_batch=2)
    bundle = load(["dataset=cifar10", f"dataset.root={tmp_path}"])
    assert len(bundle.train) == 100 and len(bundle.test) == 20
    assert bundle.train.inputs.shape == (100, 3, 32, 32)
    assert torch.bincount(bundle.train.labels).tolist() == [10] * K
    entry = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    first = torch.from_numpy(entry["data"][0].reshape(3, 32, 32))
    assert torch.equal(bundle.train.inputs[0], first)
    assert bundle.info["n_train"] == 100 and bundle.info["label_noise_actual"] == 0.0


def test_other_small_formats(tmp_path: Path) -> None:
    from scipy.io import savemat

    labels = np.tile(np.arange(K), 2)
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    images = pattern_images(labels, 3, 32, 0)
    for split in ("train", "test"):
        digits = np.where(labels == 0, 10, labels)[:, None]  # SVHN writes digit 0 as 10
        savemat(svhn / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": digits})
    bundle = load(["dataset=svhn", f"dataset.root={tmp_path}"])
    assert torch.equal(bundle.train.inputs, torch.from_numpy(images))
    assert bundle.train.labels.tolist() == labels.tolist()

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    images = pattern_images(labels, 3, 96, 1)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(stl / f"{split}_X.bin")
        (labels + 1).astype(np.uint8).tofile(stl / f"{split}_y.bin")
    bundle = load(["dataset=stl10", f"dataset.root={tmp_path}"])
    assert bundle.input_shape == (3, 96, 96)
    assert torch.equal(bundle.train.inputs, torch.from_numpy(images))
    small = load(["dataset=stl10", f"dataset.root={tmp_path}", "dataset.size=32"])
    assert small.train.inputs.shape == (20, 3, 32, 32)

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    fine = np.arange(100)
    for split in ("train", "test"):
        with open(c100 / split, "wb") as f:
            pickle.dump({"data": np.zeros((100, 3072), np.uint8), "fine_labels": fine.tolist(),
                         "coarse_labels": (fine // 5).tolist()}, f)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    bundle = load(["dataset=cifar100", f"dataset.root={tmp_path}"])
    assert bundle.num_classes == 100 and bundle.train.labels.tolist() == fine.tolist()


def test_image_folder_is_read_by_a_loader(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    overrides = ["dataset=imagenet", f"dataset.root={tmp_path}", "dataset.num_classes=3",
                 "dataset.size=8", "dataset.num_workers=0", "dataset.augment=true"]
    bundle = load(overrides)
    assert len(bundle.train) == 12 and len(bundle.test) == 6 and bundle.train.source is not None
    generator = torch.Generator().manual_seed(0)
    seen = []
    for x, y in D.batches(bundle.train, 5, generator, augment=True):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
        seen += y.tolist()
    assert sorted(seen) == sorted(bundle.train.labels.tolist())
    (x, y), *_ = D.batches(bundle.test, 4)
    assert y.tolist() == [0, 0, 1, 1]
    noisy = load([*overrides, "dataset.label_noise=pair", "dataset.label_noise_rate=0.5"])
    assert noisy.info["label_noise_actual"] == 0.5
    labels = torch.cat([y for _, y in D.batches(noisy.train, 12)])
    assert torch.equal(labels, noisy.train.labels)  # the split's labels, not the folder's


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "imagenet"])
def test_a_missing_data_set_fails_at_once_naming_folder_and_switch(tmp_path: Path,
                                                                   dataset: str) -> None:
    with pytest.raises(D.DatasetNotFound) as err:
        load([f"dataset={dataset}", f"dataset.root={tmp_path / 'nowhere'}"])
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "\n" not in message
    assert "dataset.root" in message
    if dataset != "imagenet":
        assert "dataset.download=true" in message


@pytest.fixture(scope="module")
def missing_data_cli(tmp_path_factory) -> tuple[Path, object]:
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli(["dataset=cifar10", "logger=none", "trainer.progress=false"], cwd,
                     env={"NCSWEEP_DATA": str(cwd / "data")})
    return cwd, result


def test_a_missing_data_set_fails_the_cli_at_once(missing_data_cli) -> None:
    cwd, result = missing_data_cli
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "Traceback" not in result.stderr
    assert f"dataset cifar10: no data in {cwd / 'data' / 'cifar-10-batches-py'}" in result.stderr
    assert "dataset.download=true" in result.stderr
    assert not (cwd / "data").exists()  # nothing downloaded, no folder made


def test_a_missing_data_set_is_one_line_through_the_cli(missing_data_cli) -> None:
    _, result = missing_data_cli
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DatasetNotFound: dataset cifar10: no data in " in lines[0]


# ------------------------------------------------------------ subsets, imbalance, noise, labels

def _toy_split(per_class: int = 50, k: int = K) -> D.Split:
    labels = torch.arange(k).repeat_interleave(per_class)
    return D.Split(torch.arange(labels.numel()), labels)


def test_class_subset_relabels_in_the_given_order(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bundle = load(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.classes=[7,2,5]",
                   "dataset.num_classes=3"])
    assert bundle.num_classes == 3 and len(bundle.train) == 15 and len(bundle.test) == 3
    assert bundle.test.labels.tolist() == [1, 2, 0]  # classes 2, 5, 7 in file order
    with pytest.raises(ConfigError, match=r"^dataset\.num_classes=10 is not allowed: 3, "):
        load(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.classes=[7,2,5]"])


def test_samples_per_class_is_balanced_and_seeded() -> None:
    split = _toy_split()
    a = D.subsample_per_class(split, 7, K, np.random.default_rng([0, 0]))
    b = D.subsample_per_class(split, 7, K, np.random.default_rng([0, 0]))
    c = D.subsample_per_class(split, 7, K, np.random.default_rng([1, 0]))
    assert torch.bincount(a.labels).tolist() == [7] * K
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    with pytest.raises(ConfigError, match="class 0 has only 50"):
        D.subsample_per_class(split, 51, K, np.random.default_rng(0))


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_imbalance_profiles(profile: str) -> None:
    counts = D.imbalance_counts([100] * K, profile, 10.0)
    assert counts[0] == 100 and counts[-1] == 10
    if profile == "exp":
        assert all(a > b for a, b in itertools.pairwise(counts))
        assert counts[5] == round(100 * 10 ** (-5 / 9))
    else:
        assert counts == [100] * 5 + [10] * 5
    # 139 available at ratio 10: n_min = 13 and n_max = 130 realise the ratio exactly
    uneven = D.imbalance_counts([139] * 9 + [150], profile, 10.0)
    assert uneven[0] == 130 and uneven[-1] == 13
    with pytest.raises(ConfigError, match=r"^dataset\.imbalance_ratio=140\.0 is not allowed"):
        D.imbalance_counts([139] * K, profile, 140.0)
    split = D.make_imbalanced(_toy_split(100), K, profile, 10.0, 0.5, np.random.default_rng(3))
    assert torch.bincount(split.labels, minlength=K).tolist() == counts


def test_label_noise_rates_kinds_and_seeds() -> None:
    labels = torch.arange(K).repeat_interleave(40)
    sym = D.add_label_noise(labels, K, "symmetric", 0.25, np.random.default_rng(0))
    again = D.add_label_noise(labels, K, "symmetric", 0.25, np.random.default_rng(0))
    other = D.add_label_noise(labels, K, "symmetric", 0.25, np.random.default_rng(1))
    assert torch.equal(sym, again) and not torch.equal(sym, other)
    flipped = sym != labels
    assert flipped.double().mean().item() == 0.25  # exactly 10 of 40 per class
    assert all(flipped[labels == k].sum() == 10 for k in range(K))
    assert len(set(sym[flipped].tolist())) == K  # spread over the other classes
    pair = D.add_label_noise(labels, K, "pair", 0.4, np.random.default_rng(0))
    moved = pair != labels
    assert moved.double().mean().item() == 0.4
    assert torch.equal(pair[moved], (labels[moved] + 1) % K)


def test_random_labels_and_noise_keep_the_clean_labels(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_class_per_batch=4)
    base = ["dataset=cifar10", f"dataset.root={tmp_path}"]
    noisy = load([*base, "dataset.label_noise=symmetric", "dataset.label_noise_rate=0.2"])
    clean = noisy.train.clean_labels
    assert clean is not None and torch.bincount(clean).tolist() == [20] * K
    assert noisy.info["label_noise_actual"] == pytest.approx(0.2)
    assert noisy.info["label_noise"] == "symmetric" and noisy.info["label_noise_rate"] == 0.2
    assert noisy.test.clean_labels is None  # the test set stays clean
    rand = load([*base, "dataset.random_labels=true"])
    assert rand.info["random_labels"] is True
    assert 0.75 < rand.info["label_noise_actual"] < 0.99  # about (K-1)/K disagree
    assert torch.equal(rand.train.true_labels, clean)
    again = load([*base, "dataset.random_labels=true"])
    reseeded = load([*base, "dataset.random_labels=true", "dataset.seed=1"])
    assert torch.equal(rand.train.labels, again.train.labels)
    assert not torch.equal(rand.train.labels, reseeded.train.labels)
    skewed = load([*base, "dataset.imbalance=exp", "dataset.imbalance_ratio=4",
                   "dataset.samples_per_class=16"])
    assert torch.bincount(skewed.train.labels).tolist() == D.imbalance_counts([16] * K, "exp", 4)
    assert skewed.info["train_class_count_max"] == 16 and skewed.info["imbalance_ratio"] == 4.0
    with pytest.raises(ConfigError, match=r"^dataset\.label_noise='flip' is not allowed"):
        load([*base, "dataset.label_noise=flip"])


def test_augmentation_is_a_padded_crop_and_flip_fixed_by_the_seed() -> None:
    x = torch.randint(1, 255, (6, 1, 5, 5), dtype=torch.uint8)
    view = D.ImageView([0.0], [1.0], 1, crop_padding=2, flip=True)
    out = view.augment(x, torch.Generator().manual_seed(4))
    draw = torch.Generator().manual_seed(4)
    offsets = torch.randint(0, 5, (6, 2), generator=draw)
    flips = torch.rand(6, generator=draw) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        r, c = offsets[i].tolist()
        crop = padded[i, :, r:r + 5, c:c + 5]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)
    assert torch.equal(out, view.augment(x, torch.Generator().manual_seed(4)))
    assert flips.any() and (~flips).any() and (out == 0).any()  # zero padding shows
    plain = D.ImageView([0.0], [1.0], 1, crop_padding=2, flip=True)(x)
    torch.testing.assert_close(plain, x.float() / 255)  # no generator: no augmentation


# -------------------------------------------------------------------- jobs, dry runs, memory

def test_short_training_on_an_mnist_format_set(job_runner, tmp_path: Path) -> None:
    write_mnist(tmp_path / "data")
    base = [*FAST, "dataset=mnist", f"dataset.root={tmp_path / 'data'}", "trainer.device=cpu",
            "trainer.epochs=2", "trainer.eval_every=1", "trainer.batch_size=25", "optim=adam",
            "optim.lr=0.01"]
    _, summary = job_runner([*base, "arch.width=64", "dataset.augment=true",
                             "dataset.label_noise=pair", "dataset.label_noise_rate=0.1"])
    assert summary["status"] == "done" and summary["dataset"] == "mnist"
    assert summary["train_acc"] > 0.3 and summary["label_noise_actual"] == pytest.approx(0.1)
    assert summary["augment"] is True and summary["n_train"] == 100
    _, small = job_runner([*base, "arch=resnet18", "dataset.size=16", "dim=K", "head=etf",
                           "trainer.epochs=1"])
    assert small["status"] == "done" and small["feature_dim"] == K


def test_dry_run_shows_the_parameter_saving_of_d_equals_k(job_runner, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("NCSWEEP_DATA", str(tmp_path / "no-data-here"))
    base = [*FAST, "experiment=zhu2021_cifar10_resnet18", "trainer.dry_run=true",
            "trainer.batch_size=2", "trainer.device=cpu"]
    _, wide = job_runner([*base, "head=learned", "dim=512"])
    _, narrow = job_runner([*base, "head=etf", "dim=K"])
    # the preset's 3x3 CIFAR stem has 7,680 fewer weights than torchvision's 7x7 one
    assert wide["params_total"] == PUBLISHED[("resnet18", 512)] - 64 * 3 * (49 - 9)
    assert narrow["params_total"] == PUBLISHED[("resnet18", 10)] - 64 * 3 * (49 - 9)
    saving = 1 - narrow["params_total"] / wide["params_total"]
    assert round(100 * saving, 1) == 20.7
    assert narrow["params_trainable"] == narrow["params_total"] - K * K
    assert wide["peak_memory_bytes"] > 0 and narrow["peak_memory_bytes"] > 0
    assert 0 < narrow["train_memory_bytes"] < wide["train_memory_bytes"]
    assert narrow["memory_params_bytes"] == 4 * narrow["params_total"]
    _, torchvision_stem = job_runner([*base, "head=learned", "dim=512", "arch.stem=imagenet"])
    assert torchvision_stem["params_total"] == PUBLISHED[("resnet18", 512)]
    assert not (tmp_path / "no-data-here").exists()


@pytest.mark.parametrize("arch,dataset", [*[(a, "cifar10") for a in ARCHS],
                                          *[("resnet18", d) for d in DATASETS if d != "cifar10"]])
def test_dry_run_needs_no_data(job_runner, tmp_path: Path, monkeypatch, arch: str,
                               dataset: str) -> None:
    monkeypatch.setenv("NCSWEEP_DATA", str(tmp_path / "empty"))
    _, summary = job_runner([*FAST, f"arch={arch}", f"dataset={dataset}", "dim=K", "head=etf",
                             "trainer.dry_run=true", "trainer.batch_size=2",
                             "trainer.device=cpu"])
    assert summary["status"] == "dry_run" and summary["params_total"] > 0
    assert summary["peak_memory_bytes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: checks the CUDA allocator peaks of a dry run")
def test_dry_run_on_cuda_records_allocator_peaks(job_runner, tmp_path: Path,
                                                 monkeypatch) -> None:
    monkeypatch.setenv("NCSWEEP_DATA", str(tmp_path / "empty"))
    _, summary = job_runner([*FAST, "experiment=zhu2021_cifar10_resnet18", "dim=K", "head=etf",
                             "trainer.dry_run=true", "trainer.device=cuda"])
    assert summary["device"].startswith("cuda")
    assert summary["peak_memory_kind"] == "cuda_max_allocated"
    assert summary["peak_memory_reserved_bytes"] >= summary["peak_memory_bytes"] > 0
