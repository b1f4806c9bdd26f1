"""The tensor input pipeline: the spec's CIFAR augmentation, identical to torchvision's PIL path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from hydra.utils import instantiate
from PIL import Image
from scipy.stats import chisquare

from ffsd.data.tensor_pipeline import (
    Augment,
    TensorBatches,
    augment_indices,
    crop_flip,
    normalize,
    pad_images,
    reflect_pad,
    zero_pad,
)

from .conftest import make_cfg, write_tiny_cifar100

MEAN = [0.5071, 0.4865, 0.4409]
STD = [0.2673, 0.2564, 0.2762]


def pil_path(
    arr: np.ndarray, top: int, left: int, flip: bool, mode: str = "reflect"
) -> torch.Tensor:
    """torchvision's train transforms with the random draws fixed: pad, flip, crop, normalize."""
    pad = T.Pad(4, padding_mode="reflect") if mode == "reflect" else T.Pad(4, fill=0)
    img = pad(Image.fromarray(arr))
    if flip:
        img = TF.hflip(img)
    img = TF.crop(img, top, left, 32, 32)
    return T.Normalize(MEAN, STD)(T.ToTensor()(img))


def tensor_path(
    batch_u8: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, mode: str = "reflect"
) -> torch.Tensor:
    rows, cols = augment_indices(offsets, flips, 40, 32)
    x = crop_flip(pad_images(batch_u8, 4, mode), rows, cols)
    shape = (1, 3, 1, 1)
    return normalize(x, torch.tensor(MEAN).view(shape), torch.tensor(STD).view(shape))


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_identical_to_pil_for_the_same_offsets_and_flips(mode):
    rng = np.random.default_rng(0)
    arrs = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    offsets = torch.tensor(rng.integers(0, 9, (24, 2)))
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])  # the corners
    flips = torch.tensor(rng.random(24) < 0.5)
    flips[:2] = torch.tensor([False, True])
    batch = torch.from_numpy(arrs).permute(0, 3, 1, 2).contiguous()
    got = tensor_path(batch, offsets, flips, mode)
    for k in range(24):
        want = pil_path(arrs[k], int(offsets[k, 0]), int(offsets[k, 1]), bool(flips[k]), mode)
        torch.testing.assert_close(got[k], want, rtol=0, atol=0)
    if mode == "zero":
        # The corner crop (0, 0) starts with 4 rows of black pixels (normalized 0 = -mean / std).
        black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1).expand(3, 4, 32)
        torch.testing.assert_close(got[0][:, :4], black, rtol=0, atol=0)


def test_reflect_pad_matches_torch_reflection():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    assert torch.equal(reflect_pad(x, 4).float(), want)


def test_zero_pad_matches_torch_constant_padding_and_modes_are_checked():
    x = torch.randint(1, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="constant", value=0)
    got = zero_pad(x, 4)
    assert got.dtype == torch.uint8 and torch.equal(got.float(), want)
    assert torch.equal(pad_images(x, 4, "reflect"), reflect_pad(x, 4))
    with pytest.raises(ValueError, match=r"padding_mode='edge'.*reflect, zero"):
        Augment(pad=4, crop=32, padding_mode="edge")


def _identify(batch: torch.Tensor, image_u8: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Which (top, left, flip) produced each augmented image of one source image."""
    cands = [(i, j, f) for f in (False, True) for i in range(9) for j in range(9)]
    offsets = torch.tensor([[i, j] for i, j, _ in cands])
    flips = torch.tensor([f for _, _, f in cands])
    all_crops = tensor_path(image_u8.expand(len(cands), -1, -1, -1), offsets, flips)
    dist = (batch[:, None] - all_crops[None]).flatten(2).abs().amax(2)  # B x 162
    best = dist.argmin(1)
    assert torch.all(dist[torch.arange(len(batch)), best] == 0)
    return [cands[k] for k in best.tolist()]


def test_augmentation_distribution_offsets_uniform_and_flip_half():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)  # unique crops w.h.p.
    n = 3000
    gen = torch.Generator().manual_seed(1)
    batches = TensorBatches(
        image.expand(n, -1, -1, -1),
        torch.zeros(n, dtype=torch.long),
        range(n),
        500,
        mean=MEAN,
        std=STD,
        augment=Augment(pad=4, crop=32),
        generator=gen,
    )
    draws = [d for x, _ in batches for d in _identify(x, image)]
    tops = np.bincount([d[0] for d in draws], minlength=9)
    lefts = np.bincount([d[1] for d in draws], minlength=9)
    flips = sum(d[2] for d in draws)
    # Uniform over 0..8: a chi-square test at the 0.1 % level (deterministic seeds).
    assert chisquare(tops).pvalue > 1e-3 and chisquare(lefts).pvalue > 1e-3
    assert tops.min() > 0 and lefts.min() > 0
    # Flip rate 1/2 within 4 standard deviations.
    assert abs(flips / n - 0.5) < 4 * (0.25 / n) ** 0.5


def test_cifar_tensor_pipeline_end_to_end(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=30, n_test=10)
    cfg = make_cfg(
        "dataset=cifar100",
        f"dataset.root={tmp_path}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.pipeline=tensor",
        "trainer.output_dir=/unused",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    loader = data.train_loader(8, seed=0, epoch=1)
    assert len(loader) == 4
    batches = list(loader)
    assert [x.shape for x, _ in batches] == [(8, 3, 32, 32)] * 3 + [(6, 3, 32, 32)]
    # Labels travel with their images: every sample once, labels from the dataset's targets.
    order = loader.order.tolist()
    targets = data.train_set.targets
    assert sorted(order) == list(range(30))
    assert torch.cat([y for _, y in batches]).tolist() == [targets[i] for i in order]
    # Exact normalization at test time: ToTensor + Normalize of the raw pixels.
    xt, _ = next(iter(data.test_loader(10)))
    want = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(a)) for a in data.test_set.data])
    torch.testing.assert_close(xt, want, rtol=0, atol=0)


def test_epoch_replays_exactly_and_skipping_keeps_later_batches(tmp_path):
    write_tiny_cifar100(tmp_path, n_train=40, n_test=4)
    cfg = make_cfg(
        "dataset=cifar100",
        f"dataset.root={tmp_path}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.pipeline=tensor",
        "trainer.output_dir=/unused",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    full = [x for x, _ in data.train_loader(8, seed=5, epoch=3)]
    again = [x for x, _ in data.train_loader(8, seed=5, epoch=3)]
    rest = [x for x, _ in data.train_loader(8, seed=5, epoch=3, skip_batches=2)]
    other = [x for x, _ in data.train_loader(8, seed=5, epoch=4)]
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(full[2:], rest))
    assert not torch.equal(full[0], other[0])


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
def test_pipeline_choice_is_validated(dataset, tmp_path):
    from ffsd.config import ConfigError
    from ffsd.tasks.validation import validate

    cfg = make_cfg(f"dataset={dataset}", "dataset.pipeline=gpu", "trainer.output_dir=/unused")
    with pytest.raises(ConfigError, match=r"dataset\.pipeline='gpu'.*tensor, dataloader"):
        validate(cfg)
    if dataset == "imagenet":
        cfg = make_cfg("dataset=imagenet", "dataset.pipeline=tensor", "trainer.output_dir=/unused")
        with pytest.raises(ConfigError, match=r"pipeline='tensor' is not available.*dataloader"):
            validate(cfg)
