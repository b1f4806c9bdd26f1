"""The data-module interface: datasets, per-epoch seeded sharded loaders, clear missing-data errors.

A data module owns a train and a test dataset and hands out loaders. Shuffling is a function of
(seed, epoch), and every rank of a distributed job draws its own shard of the same permutation
(``DistributedSampler``, also for a single process), so a resumed epoch replays exactly; a run
resumed in the middle of an epoch skips the batches already done (``skip_batches``).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ffsd.preemption import quiet_worker


class DataNotFoundError(FileNotFoundError):
    """Raised before any work when a dataset is not where the config says."""


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
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        image_size: int,
        topk: Sequence[int],
        loader: dict[str, Any],
    ) -> None:
        self.name = name
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.topk = tuple(topk)
        self.loader_cfg = dict(loader)
        self._train: Dataset | None = None
        self._test: Dataset | None = None

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
        skip_batches: int = 0,
    ) -> DataLoader:
        """Shuffled loader of this rank's shard of epoch ``epoch``, reproducible from the seed.

        ``skip_batches``: leave out the first batches of that order (a mid-epoch resume).
        """
        sampler: Sampler[int] = DistributedSampler(
            self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        if skip_batches:
            sampler = SkipSampler(sampler, int(skip_batches) * int(batch_size))
        return DataLoader(
            self.train_set,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=loader_generator(seed, epoch, rank),
            **self._loader_kwargs(),
        )

    def test_loader(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> DataLoader:
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
