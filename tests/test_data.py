"""Data modules: real CIFAR/ImageFolder loaders on small data in the real format; digits; errors."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ffsd.data import DataNotFoundError

from .conftest import make_cfg, write_tiny_cifar100


def data_from(*overrides):
    cfg = make_cfg("trainer.output_dir=/unused", *overrides)
    return instantiate(cfg.dataset, _convert_="all")


def test_tiny_cifar100_through_the_safe_reader_and_torchvision_loader(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=20, n_test=10)
    data = data_from(
        "dataset=cifar100",
        f"dataset.root={tmp_path}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.loader.num_workers=0",
    )
    data.check()
    assert len(data.train_set) == 20 and len(data.test_set) == 10
    assert type(data.train_set).__mro__[1].__module__.startswith("torchvision")
    x, y = next(iter(data.train_loader(8, seed=0, epoch=1)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar_test_transform_is_exact_normalization(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=4, n_test=4)
    data = data_from(
        "dataset=cifar100", f"dataset.root={tmp_path}", "dataset.verify_checksums=false"
    )
    raw = data.test_set.data[0]  # H x W x C uint8
    x, _ = data.test_set[0]
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    expected = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)


def test_cifar_train_augmentation_is_pad_flip_crop(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=1, n_test=1)
    data = data_from(
        "dataset=cifar100", f"dataset.root={tmp_path}", "dataset.verify_checksums=false"
    )
    raw = torch.from_numpy(data.train_set.data[0]).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1)
    padded = torch.nn.functional.pad(raw[None], (4, 4, 4, 4), mode="reflect")[0]
    candidates = []
    for flip in (False, True):
        src = padded.flip(-1) if flip else padded
        for i in range(9):
            for j in range(9):
                candidates.append((src[:, i : i + 32, j : j + 32] - mean) / std)
    stacked = torch.stack(candidates)
    torch.manual_seed(0)
    for _ in range(20):
        x, _ = data.train_set[0]
        # Every augmented image is one of the 2 x 9 x 9 flip/offset crops of the padded image.
        assert (stacked - x).abs().flatten(1).amax(1).min() < 1e-5


def test_missing_cifar_fails_fast_with_layout_and_switch(tmp_path):
    data = data_from("dataset=cifar100", f"dataset.root={tmp_path / 'absent'}")
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as err:
        data.check()
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert (
        str(tmp_path / "absent") in msg
        and "cifar-100-python" in msg
        and "dataset.download=true" in msg
    )


def test_cifar10_layout_named_in_error(tmp_path):
    data = data_from("dataset=cifar10", f"dataset.root={tmp_path}")
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        data.check()


def test_download_failure_offline_is_clear(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = data_from("dataset=cifar100", f"dataset.root={tmp_path}", "dataset.download=true")
    with pytest.raises(DataNotFoundError, match="download"):
        data.check()


def _write_image_folder(root, classes=3, per_class=2, size=48):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img_{i}.JPEG", format="JPEG")


def test_imagefolder_loader_on_real_jpegs(tmp_path):
    _write_image_folder(tmp_path)
    data = data_from(
        "dataset=imagenet",
        f"dataset.root={tmp_path}",
        "dataset.num_classes=3",
        "dataset.topk=[1]",
        "dataset.loader.num_workers=0",
        "dataset.loader.persistent_workers=false",
        "dataset.loader.prefetch_factor=null",
    )
    data.check()
    x, y = next(iter(data.train_loader(4, seed=0, epoch=1)))
    assert y.max() < 3
    assert x.shape == (4, 3, 224, 224)
    xt, yt = next(iter(data.test_loader(6)))
    assert xt.shape == (6, 3, 224, 224) and sorted(yt.tolist()) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_missing_and_class_count_errors(tmp_path):
    data = data_from("dataset=imagenet", f"dataset.root={tmp_path}")
    with pytest.raises(DataNotFoundError, match="train"):
        data.check()
    _write_image_folder(tmp_path)
    data = data_from("dataset=imagenet", f"dataset.root={tmp_path}")  # num_classes 1000
    with pytest.raises(ValueError, match=r"dataset\.num_classes"):
        _ = data.train_set


def test_digits_are_real_resized_and_split_with_a_fixed_seed():
    data = data_from("dataset=digits")
    xtr, ytr = data.train_set.tensors
    xte, yte = data.test_set.tensors
    assert len(ytr) + len(yte) == 1797
    assert len(yte) == math.ceil(0.2 * 1797)  # scikit-learn rounds the test share up
    assert xtr.shape[1:] == (3, 32, 32)
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    assert abs(xtr.mean().item()) < 0.05 and abs(xtr.std().item() - 1) < 0.05  # normalized
    again = data_from("dataset=digits")
    assert torch.equal(again.test_set.tensors[0], xte)


def test_synthetic_any_shape_and_learnable():
    data = data_from(
        "dataset=synthetic",
        "dataset.image_size=16",
        "dataset.num_classes=4",
        "dataset.train_size=10",
    )
    x, y = data.train_set.tensors
    assert x.shape == (10, 3, 16, 16) and y.max() < 4


def test_train_order_depends_on_seed_and_epoch_only():
    data = data_from("dataset=synthetic")

    def order(seed, epoch):
        return torch.cat([y for _, y in data.train_loader(64, seed=seed, epoch=epoch)])

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 2))
    assert not torch.equal(order(0, 1), order(1, 1))


def _order(loader) -> list[int]:
    return loader.order.tolist() if hasattr(loader, "order") else list(loader.sampler)


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
def test_ranks_get_disjoint_shards_and_test_shards_cover_exactly(pipeline):
    data = data_from(
        "dataset=synthetic",
        "dataset.train_size=100",
        "dataset.test_size=11",
        f"dataset.pipeline={pipeline}",
    )
    ids = [_order(data.train_loader(100, seed=0, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 50
    test = [_order(data.test_loader(4, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in test for i in shard) == list(range(11))


def test_both_pipelines_visit_the_same_samples_in_the_same_order():
    common = ("dataset=synthetic", "dataset.train_size=40")
    tensor = data_from(*common, "dataset.pipeline=tensor")
    loader = data_from(*common, "dataset.pipeline=dataloader")
    a = [(x, y) for x, y in tensor.train_loader(16, seed=3, epoch=2)]
    b = [(x, y) for x, y in loader.train_loader(16, seed=3, epoch=2)]
    assert [len(y) for _, y in a] == [16, 16, 8]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
