"""Random images of any shape, for tests and benchmarks; learnable when ``signal`` > 0.

Each class has a fixed random prototype; an image is ``signal · prototype + noise``. Everything
derives from ``seed``, so two runs see identical data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from ffsd.data.base import DataModule


class SyntheticData(DataModule):
    def __init__(
        self, *, train_size: int, test_size: int, signal: float, seed: int, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if train_size < 1 or test_size < 1:
            raise ValueError(
                f"dataset.train_size and dataset.test_size must be >= 1, got "
                f"{train_size} and {test_size}"
            )
        self.train_size, self.test_size = int(train_size), int(test_size)
        self.signal, self.seed = float(signal), int(seed)

    def check(self) -> None:
        """Generated: nothing to look for."""

    def _make(self, n: int, offset: int) -> Dataset:
        g = torch.Generator().manual_seed(self.seed)
        shape = (3, self.image_size, self.image_size)
        protos = torch.randn(self.num_classes, *shape, generator=g)
        g.manual_seed(self.seed + offset)
        y = torch.randint(self.num_classes, (n,), generator=g)
        x = self.signal * protos[y] + torch.randn(n, *shape, generator=g)
        return TensorDataset(x, y)

    supports_tensor_pipeline = True

    def memory_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.train_set if split == "train" else self.test_set
        return ds.tensors

    def build_train(self) -> Dataset:
        return self._make(self.train_size, 1)

    def build_test(self) -> Dataset:
        return self._make(self.test_size, 2)
