"""The data-module interface: datasets, per-epoch seeded sharded loaders, clear missing-data errors.

A data module owns a train and a test dataset and hands out loaders. Shuffling is a function of
(seed, epoch), and every rank of a distributed job draws its own shard of the same permutation
(``DistributedSampler``, also for a single process), so a resumed epoch replays exactly; a run
resumed in the middle of an epoch skips the batches already done (``skip_batches``).

Two pipelines (``dataset.pipeline``): ``dataloader`` runs per-sample transforms in a PyTorch
DataLoader (what the release does, and the only choice for ImageFolder data); ``tensor`` keeps
the whole split in memory as one tensor on the training device and cuts, augments and normalizes
each batch with tensor ops (``ffsd.data.tensor_pipeline``).

``train_loader(views=K)`` augments each sample K times independently (KDCL and PCL: network k
sees view k, ``shared/baselines-spec.md`` sections 6 (a) and 7 (a)): every batch is then
``(images, labels)`` with images K x B x C x H x W. ``views=1`` (the default) is the plain
B x C x H x W batch, the very same batches and random draws as without the option.
"""

from __future__ import annotations

import copy
import itertools
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ffsd.data.tensor_pipeline import Augment, TensorBatches
from ffsd.data.workers import quiet_worker

PIPELINES = ("tensor", "dataloader")


class DataNotFoundError(FileNotFoundError):
    """Raised before any work when a dataset is not where the config says."""


class DataIntegrityError(DataNotFoundError):
    """A dataset file is there but is not what it claims: not the official file (checksum), or
    content the format never holds (a pickle that would run code). A :class:`DataNotFoundError`,
    so every caller that stops on missing data stops on this too."""


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``range(n)`` in order, without the padding DistributedSampler adds.

    For evaluation: summing per-rank counts then gives exact metrics over the whole test set.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """``sampler``'s indices without the first ``skip`` (the batches a resumed epoch has done)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class MultiView(Dataset):
    """``dataset`` whose items carry ``views`` independent draws of its random train transform.

    Item i is ``(K x C x H x W, label)``: the transform runs K times on the one image read for
    i (no second read or decode), each run drawing its own crop and flip, as shaoeric-KDCL's and
    shaoeric-PCL's datasets do (``shared/baselines-spec.md`` 6 (a), 7 (a)). A dataset without a
    ``transform`` (digits, synthetic: no augmentation) gives K identical copies. Batch these
    with :func:`collate_views`.
    """

    def __init__(self, dataset: Dataset, views: int) -> None:
        self.views = int(views)
        self.transform = getattr(dataset, "transform", None)
        if self.transform is not None:
            # A shallow copy shares the images; only the copy returns them untransformed.
            dataset = copy.copy(dataset)
            dataset.transform = None
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        if self.transform is None:
            return torch.stack([torch.as_tensor(image)] * self.views), label
        return torch.stack([self.transform(image) for _ in range(self.views)]), label


def collate_views(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch :class:`MultiView` items view-major: images K x B x C x H x W, labels B."""
    images = torch.stack([x for x, _ in batch], dim=1)
    return images, default_collate([y for _, y in batch])


def loader_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A generator that depends on (seed, epoch, rank) only: seeds the loader's worker processes.

    Ranks > 0 get their own worker seeds (otherwise worker k of every rank would draw the same
    augmentations); rank 0 keeps the single-process seed.
    """
    base = int(seed) * 100_003 + int(epoch)
    if rank:
        base = int(np.random.SeedSequence([base, int(rank)]).generate_state(1)[0])
    return torch.Generator().manual_seed(base)


class DataModule(ABC):
    """Base class of every ``conf/dataset`` option.

    Args:
        name: the dataset's name (shown in errors and logs).
        num_classes: classes of the classification task.
        image_size: side of the square images the networks see.
        topk: the k of the top-k accuracies to report.
        loader: DataLoader settings (``num_workers``, ``pin_memory``, ``persistent_workers``,
            ``prefetch_factor``); ``pin_memory: auto`` pins when CUDA is available.
        pipeline: ``tensor`` or ``dataloader`` (module docstring); a module that cannot hold its
            data in memory supports ``dataloader`` only.
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        image_size: int,
        topk: Sequence[int],
        loader: dict[str, Any],
        pipeline: str = "dataloader",
    ) -> None:
        if pipeline not in PIPELINES:
            raise ValueError(
                f"dataset.pipeline={pipeline!r} is not valid; choose one of: {', '.join(PIPELINES)}"
            )
        if pipeline == "tensor" and not self.supports_tensor_pipeline:
            raise ValueError(
                f"dataset.pipeline=tensor is not available for {name} (its images do not fit in "
                "memory as one tensor); use dataset.pipeline=dataloader"
            )
        self.pipeline = pipeline
        self._resident: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.name = name
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.topk = tuple(topk)
        self.loader_cfg = dict(loader)
        self._train: Dataset | None = None
        self._test: Dataset | None = None

    #: Whether ``memory_tensors`` is implemented (the ``tensor`` pipeline is available).
    supports_tensor_pipeline = False

    def memory_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of ``split`` ("train"/"test") as tensors: uint8 N x C x H x W raw
        pixels (normalized per batch with ``norm``), or float already normalized."""
        raise NotImplementedError(f"{self.name} has no in-memory tensor form")

    def norm(self) -> tuple[list[float], list[float]] | None:
        """Per-channel (mean, std) applied to uint8 images of the tensor pipeline."""
        return None

    def train_augment(self) -> Augment | None:
        """Train-time augmentation of the tensor pipeline."""
        return None

    def resident(self, split: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``memory_tensors(split)`` on ``device``, moved there once and kept."""
        key = (split, str(device))
        if key not in self._resident:
            x, y = self.memory_tensors(split)
            self._resident[key] = (x.to(device), y.to(device))
        return self._resident[key]

    @abstractmethod
    def check(self) -> None:
        """Fail fast (:class:`DataNotFoundError`) if the data is not there; cheap."""

    @abstractmethod
    def build_train(self) -> Dataset: ...

    @abstractmethod
    def build_test(self) -> Dataset: ...

    @property
    def train_set(self) -> Dataset:
        if self._train is None:
            self._train = self.build_train()
        return self._train

    @property
    def test_set(self) -> Dataset:
        if self._test is None:
            self._test = self.build_test()
        return self._test

    def _loader_kwargs(self) -> dict[str, Any]:
        cfg = self.loader_cfg
        workers = int(cfg.get("num_workers", 0))
        pin = cfg.get("pin_memory", "auto")
        kw: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available() if pin == "auto" else bool(pin),
        }
        if workers > 0:
            kw["worker_init_fn"] = quiet_worker
            kw["persistent_workers"] = bool(cfg.get("persistent_workers", False))
            if cfg.get("prefetch_factor"):
                kw["prefetch_factor"] = int(cfg["prefetch_factor"])
        return kw

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        skip_batches: int = 0,
        views: int = 1,
    ) -> DataLoader | TensorBatches:
        """Shuffled batches of this rank's shard of epoch ``epoch``, reproducible from the seed.

        ``skip_batches`` leaves out the first batches of that order (a mid-epoch resume); the
        tensor pipeline puts the batches on ``device``.

        ``views``: each batch is ``(images, labels)``, images B x C x H x W for 1 and
        K x B x C x H x W for ``views=K`` > 1, view v of sample i an independent draw of the
        train augmentation (``shared/baselines-spec.md`` 6 (a), 7 (a)); K identical copies for a
        dataset without augmentation. The tensor pipeline draws view 0 as a 1-view epoch does
        (view 0 is the 1-view epoch) and replays every view exactly after ``skip_batches``; the
        DataLoader path draws the views one after the other from the same random streams as a
        single view (the global torch RNG with ``num_workers=0``, the (seed, epoch, rank)
        seeded workers otherwise).
        """
        if isinstance(views, bool) or not isinstance(views, numbers.Integral) or views < 1:
            raise ValueError(f"views={views!r} must be an integer >= 1")
        sampler: Sampler[int] = DistributedSampler(
            self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        if self.pipeline == "tensor":
            images, labels = self.resident("train", device)
            mean, std = self.norm() or (None, None)
            gen = torch.Generator(device=images.device).manual_seed(
                loader_generator(seed, epoch, rank).initial_seed()
            )
            order = list(sampler)
            if drop_last:
                order = order[: len(order) // batch_size * batch_size]
            return TensorBatches(
                images,
                labels,
                order,
                batch_size,
                mean=mean,
                std=std,
                augment=self.train_augment(),
                generator=gen,
                start_batch=int(skip_batches),
                views=int(views),
            )
        if skip_batches:
            sampler = SkipSampler(sampler, int(skip_batches) * int(batch_size))
        # views=1 keeps the plain dataset and collate: the very same batches as without views.
        extra: dict[str, Any] = {}
        dataset = self.train_set
        if views > 1:
            dataset, extra["collate_fn"] = MultiView(dataset, int(views)), collate_views
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=loader_generator(seed, epoch, rank),
            **extra,
            **self._loader_kwargs(),
        )

    def test_loader(
        self,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> DataLoader | TensorBatches:
        if self.pipeline == "tensor":
            images, labels = self.resident("test", device)
            mean, std = self.norm() or (None, None)
            order = list(ShardSampler(len(labels), rank, world_size))
            return TensorBatches(images, labels, order, batch_size, mean=mean, std=std)
        return DataLoader(
            self.test_set,
            batch_size=batch_size,
            sampler=ShardSampler(len(self.test_set), rank, world_size),
            **self._loader_kwargs(),
        )

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_set)} train / {len(self.test_set)} test images, "
            f"{self.num_classes} classes, {self.image_size}x{self.image_size}"
        )
