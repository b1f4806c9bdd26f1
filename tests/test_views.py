"""K independently augmented views per sample (``train_loader(views=K)``) and ``dataset.pad_mode``.

Both pipelines: shapes, that every view is a genuine draw of the train augmentation (uniform crop
offsets, flip rate 1/2, views independent), that ``views=1`` is today's batches, (seed, epoch)
determinism and exact mid-epoch replay of every view.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.stats import chi2_contingency, chisquare
from torch.utils.data import DataLoader, DistributedSampler

from ffsd.data import CIFARData
from ffsd.data.base import MultiView, loader_generator
from ffsd.data.tensor_pipeline import Augment, TensorBatches

from .conftest import make_cfg, write_tiny_cifar100
from .test_tensor_pipeline import MEAN, STD, pil_path, tensor_path

PIPELINES = ["tensor", "dataloader"]


def cifar(tmp_path, *overrides: str, n_train: int = 30):
    write_tiny_cifar100(tmp_path, n_train=n_train, n_test=4)
    cfg = make_cfg(
        "dataset=cifar100",
        f"dataset.root={tmp_path}",
        "dataset.verify_checksums=false",  # tiny files, not the official ones
        "dataset.loader.num_workers=0",
        "trainer.output_dir=/unused",
        *overrides,
    )
    return instantiate(cfg.dataset, _convert_="all")


def key(image: torch.Tensor) -> bytes:
    return image.contiguous().numpy().tobytes()


CANDIDATES = [(i, j, f) for f in (False, True) for i in range(9) for j in range(9)]


def draws_of(arr_hwc: np.ndarray, mode: str) -> dict[bytes, tuple[int, int, bool]]:
    """Every (top, left, flip) augmentation of one raw image, keyed by its exact output."""
    image = torch.from_numpy(arr_hwc).permute(2, 0, 1)[None]
    offsets = torch.tensor([[i, j] for i, j, _ in CANDIDATES])
    flips = torch.tensor([f for _, _, f in CANDIDATES])
    crops = tensor_path(image.expand(len(CANDIDATES), -1, -1, -1), offsets, flips, mode)
    table = {key(c): d for c, d in zip(crops, CANDIDATES)}
    assert len(table) == len(CANDIDATES)  # a random image: all 162 crops differ
    return table


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


# -- shapes, genuine draws, views=1 unchanged -------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_k_views_are_distinct_draws_of_the_augmentation(pipeline, mode, tmp_path):
    data = cifar(tmp_path, f"dataset.pipeline={pipeline}", f"dataset.pad_mode={mode}")
    torch.manual_seed(0)
    batches = list(data.train_loader(8, seed=1, epoch=2, views=3))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 8, 3, 32, 32)] * 3 + [(3, 6, 3, 32, 32)]
    assert [tuple(y.shape) for _, y in batches] == [(8,)] * 3 + [(6,)]
    raw, targets = data.train_set.data, data.train_set.targets
    loader = data.train_loader(8, seed=1, epoch=2)
    order = loader.order.tolist() if pipeline == "tensor" else list(loader.sampler)
    ys = torch.cat([y for _, y in batches])
    assert ys.tolist() == [targets[i] for i in order]
    xs = torch.cat([x for x, _ in batches], dim=1)  # 3 x 30 x C x H x W
    tables = {}
    for i, src in enumerate(order):
        table = tables.setdefault(src, draws_of(raw[src], mode))
        # Every view of a sample is one of the pad/flip/crop images of that sample's pixels.
        found = [table.get(key(xs[v, i])) for v in range(3)]
        assert None not in found
    # Independent draws: three identical views of 30 samples would be a 1 in 162^60 event.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(xs[a], xs[b])
        assert sum(torch.equal(xs[a, i], xs[b, i]) for i in range(30)) < 6


def test_tensor_views_one_is_todays_draws_and_view_0_of_k_views(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=tensor")
    one = list(data.train_loader(8, seed=4, epoch=3, views=1))
    default = list(data.train_loader(8, seed=4, epoch=3))
    assert same(one, default) and all(x.shape[1:] == (3, 32, 32) for x, _ in one)
    # Today's draws, done by hand: offsets for the epoch, then flips, from the (seed, epoch) stream.
    order = data.train_loader(8, seed=4, epoch=3).order.tolist()
    gen = torch.Generator().manual_seed(loader_generator(4, 3).initial_seed())
    offsets = torch.randint(0, 9, (30, 2), generator=gen)
    flips = torch.rand(30, generator=gen) < 0.5
    raw = data.train_set.data
    want = torch.stack(
        [
            pil_path(raw[s], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]))
            for i, s in enumerate(order)
        ]
    )
    torch.testing.assert_close(torch.cat([x for x, _ in one]), want, rtol=0, atol=0)
    # View 0 of a K-view epoch is the 1-view epoch; the labels are the same.
    three = list(data.train_loader(8, seed=4, epoch=3, views=3))
    assert same([(x[0], y) for x, y in three], one)


def test_dataloader_views_one_is_todays_loader(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=dataloader")
    loader = data.train_loader(8, seed=4, epoch=3, views=1)
    assert loader.dataset is data.train_set  # no wrapper, the default collate
    torch.manual_seed(7)
    got = list(loader)
    sampler = DistributedSampler(data.train_set, num_replicas=1, rank=0, shuffle=True, seed=4)
    sampler.set_epoch(3)
    today = DataLoader(
        data.train_set, batch_size=8, sampler=sampler, generator=loader_generator(4, 3)
    )
    torch.manual_seed(7)
    assert same(got, list(today))
    assert all(x.shape[1:] == (3, 32, 32) for x, _ in got)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_without_augmentation_views_are_identical_copies(pipeline):
    cfg = make_cfg(
        "dataset=synthetic",
        "dataset.train_size=20",
        f"dataset.pipeline={pipeline}",
        "trainer.output_dir=/unused",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    one = list(data.train_loader(8, seed=0, epoch=1))
    three = list(data.train_loader(8, seed=0, epoch=1, views=3))
    assert [tuple(x.shape) for x, _ in three] == [(3, 8, 3, 32, 32)] * 2 + [(3, 4, 3, 32, 32)]
    for (x1, y1), (x3, y3) in zip(one, three):
        assert torch.equal(y1, y3) and all(torch.equal(x3[v], x1) for v in range(3))
    x3 = three[0][0]
    x3[1].zero_()  # copies, not a view of one another
    assert not torch.equal(x3[0], x3[1])


def test_views_must_be_a_positive_integer(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=tensor")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="views="):
            data.train_loader(8, seed=0, epoch=1, views=bad)


# -- distribution of every view ----------------------------------------------------------------


def _check_distribution(draws: np.ndarray) -> None:
    """``draws``: views x n x 3 (top, left, flip) of independent augmentations."""
    views, n, _ = draws.shape
    for v in range(views):
        tops = np.bincount(draws[v, :, 0], minlength=9)
        lefts = np.bincount(draws[v, :, 1], minlength=9)
        # Uniform over 0..8 (chi-square at the 0.1 % level) and flip rate 1/2 within 4 sd.
        assert chisquare(tops).pvalue > 1e-3 and chisquare(lefts).pvalue > 1e-3
        assert abs(draws[v, :, 2].mean() - 0.5) < 4 * (0.25 / n) ** 0.5
    for a in range(views):
        for b in range(a + 1, views):
            # Independent views: no association between their offsets, nor between their flips,
            # and a view repeats another (same top, left and flip) about 1 time in 162.
            for axis in (0, 1, 2):
                table = np.zeros((9, 9) if axis < 2 else (2, 2))
                np.add.at(table, (draws[a, :, axis], draws[b, :, axis]), 1)
                assert chi2_contingency(table).pvalue > 1e-3
            equal = np.all(draws[a] == draws[b], axis=1).mean()
            assert abs(equal - 1 / 162) < 4 * (1 / 162 / n) ** 0.5


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_tensor_pipeline_every_view_uniform_flip_half_independent(mode):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    table = draws_of(arr, mode)
    image = torch.from_numpy(arr).permute(2, 0, 1)[None]
    n, views = 2000, 3
    batches = TensorBatches(
        image.expand(n, -1, -1, -1),
        torch.zeros(n, dtype=torch.long),
        range(n),
        500,
        mean=MEAN,
        std=STD,
        augment=Augment(pad=4, crop=32, padding_mode=mode),
        generator=torch.Generator().manual_seed(1),
        views=views,
    )
    xs = torch.cat([x for x, _ in batches], dim=1)
    draws = np.array([[table[key(xs[v, i])] for i in range(n)] for v in range(views)], dtype=int)
    _check_distribution(draws)


def test_dataloader_every_view_uniform_flip_half_independent(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=dataloader", "dataset.pad_mode=zero", n_train=1)
    n = 1500
    ds = data.train_set
    ds.data = np.repeat(ds.data[:1], n, axis=0)  # one image, drawn n times per view
    ds.targets = ds.targets[:1] * n
    table = draws_of(ds.data[0], "zero")
    torch.manual_seed(0)
    xs = torch.cat([x for x, _ in data.train_loader(500, seed=0, epoch=1, views=2)], dim=1)
    draws = np.array([[table[key(xs[v, i])] for i in range(n)] for v in range(2)], dtype=int)
    _check_distribution(draws)


def test_multiview_transforms_one_read_image_k_times():
    class Counting(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.reads, self.transform = 0, lambda img: img + torch.rand(())

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i):
            self.reads += 1
            img = torch.full((1, 2, 2), float(i))
            return (self.transform(img) if self.transform else img), i

    base = Counting()
    x, y = MultiView(base, 4)[2]
    assert x.shape == (4, 1, 2, 2) and y == 2
    assert base.transform is not None  # the original dataset is left as it was
    assert len({float(v[0, 0, 0]) for v in x}) == 4 and bool(((x >= 2) & (x < 3)).all())


# -- determinism and mid-epoch replay ----------------------------------------------------------


def test_tensor_views_deterministic_per_seed_epoch_and_replay_every_view(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=tensor", n_train=40)
    full = list(data.train_loader(8, seed=5, epoch=3, views=3))
    assert same(full, list(data.train_loader(8, seed=5, epoch=3, views=3)))
    other = list(data.train_loader(8, seed=5, epoch=4, views=3))
    assert all(not torch.equal(full[0][0][v], other[0][0][v]) for v in range(3))
    for s in (1, 2, 4):
        rest = list(data.train_loader(8, seed=5, epoch=3, views=3, skip_batches=s))
        assert same(rest, full[s:])


def test_dataloader_views_replay_exactly_from_the_saved_rng_state(tmp_path):
    # With num_workers=0 the transforms draw from the global RNG, which the engine's mid-epoch
    # checkpoint saves and restores: from that state the rest of the epoch replays exactly.
    data = cifar(tmp_path, "dataset.pipeline=dataloader", n_train=40)
    torch.manual_seed(11)
    states, full = [], []
    for batch in iter(data.train_loader(8, seed=5, epoch=3, views=3)):
        full.append(batch)
        states.append(torch.get_rng_state())
    torch.manual_seed(11)
    assert same(full, list(data.train_loader(8, seed=5, epoch=3, views=3)))
    for s in (1, 3):
        torch.set_rng_state(states[s - 1])
        rest = list(data.train_loader(8, seed=5, epoch=3, views=3, skip_batches=s))
        assert same(rest, full[s:])


def test_dataloader_views_with_workers_deterministic_per_seed_epoch(tmp_path):
    data = cifar(tmp_path, "dataset.pipeline=dataloader", "dataset.loader.num_workers=2")
    full = list(data.train_loader(8, seed=5, epoch=3, views=2))
    assert full[0][0].shape == (2, 8, 3, 32, 32)
    torch.manual_seed(123)  # the workers' seeds come from (seed, epoch, rank), not this
    assert same(full, list(data.train_loader(8, seed=5, epoch=3, views=2)))
    other = list(data.train_loader(8, seed=5, epoch=4, views=2))
    assert not torch.equal(full[0][0], other[0][0])
    # Resumed mid-epoch with workers: the same samples in the same order (the augmentations of
    # the rest of the epoch differ, as with one view; README, "Resume and requeue").
    rest = list(data.train_loader(8, seed=5, epoch=3, views=2, skip_batches=2))
    assert [y.tolist() for _, y in rest] == [y.tolist() for _, y in full[2:]]
    assert all(x.shape[:2] == (2, len(y)) for x, y in rest)


# -- pad_mode ----------------------------------------------------------------------------------


def test_bad_pad_mode_is_refused_with_key_value_and_choices(tmp_path):
    from ffsd.config import ConfigError
    from ffsd.tasks.validation import validate

    cfg = make_cfg("dataset=cifar10", "dataset.pad_mode=mirror", "trainer.output_dir=/unused")
    kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
    del kwargs["_target_"]
    with pytest.raises(ValueError, match=r"dataset\.pad_mode='mirror'.*reflect, zero"):
        CIFARData(**kwargs)
    with pytest.raises(ConfigError, match=r"dataset\.pad_mode='mirror'.*reflect, zero"):
        validate(cfg)
    for dataset in ("cifar100", "synthetic"):  # a valid mode, or no such key: nothing to say
        cfg = make_cfg(f"dataset={dataset}", "trainer.output_dir=/unused")
        try:
            validate(cfg)
        except ConfigError as err:
            assert "pad_mode" not in str(err)
