"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, offline, for the quickstart.

Each image is scaled to 32x32 (bilinear), repeated to 3 channels and normalized; a fixed,
seeded, stratified split keeps ``test_fraction`` of the images for testing. The whole set is a
few MB, so it lives in memory as tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ffsd.data.base import DataModule


class DigitsData(DataModule):
    def __init__(
        self,
        *,
        test_fraction: float,
        split_seed: int,
        mean: float,
        std: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"dataset.test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.mean, self.std = float(mean), float(std)
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def check(self) -> None:
        """Bundled with scikit-learn: nothing to look for."""

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._tensors is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # N x 1 x 8 x 8
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
            x = ((x - self.mean) / self.std).expand(-1, 3, -1, -1).contiguous()
            y = torch.tensor(digits.target, dtype=torch.long)
            idx_train, idx_test = train_test_split(
                range(len(y)),
                test_size=self.test_fraction,
                random_state=self.split_seed,
                stratify=digits.target,
            )
            self._tensors = {
                "train": (x[idx_train], y[idx_train]),
                "test": (x[idx_test], y[idx_test]),
            }
        return self._tensors

    supports_tensor_pipeline = True

    def memory_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load()[split]

    def build_train(self) -> Dataset:
        return TensorDataset(*self._load()["train"])

    def build_test(self) -> Dataset:
        return TensorDataset(*self._load()["test"])
