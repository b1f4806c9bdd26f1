"""CIFAR-10/100 from the standard python-pickle layout, through torchvision's dataset classes.

Layout under ``root``: ``cifar-100-python/{train,test,meta}`` or
``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (what the official archives
unpack to). Augmentation per the spec ("Data (CIFAR)"): reflect-pad 4 -> random horizontal flip
-> random 32x32 crop -> to [0, 1] -> normalize; test: to [0, 1] -> normalize. With
``pipeline: tensor`` the same augmentation runs on whole uint8 batches on the training device.

``pad_mode: zero`` pads with black pixels instead, the baselines' ``RandomCrop(32, padding=4)``
(ONE, OKDDip, MCL-OKD, shaoeric-PCL/KDCL; ``shared/baselines-spec.md`` "Reference protocols").
They crop before flipping; the flip of a uniformly placed crop is the crop of the flipped
padding, so pad -> flip -> crop draws the same distribution of images.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import Dataset

from ffsd.data.base import DataModule, DataNotFoundError
from ffsd.data.tensor_pipeline import PAD_MODES, Augment

_LAYOUTS = {
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
    "cifar10": (
        "cifar-10-batches-py",
        [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
    ),
}


def _checked(base: type) -> type:
    """torchvision's class, with the MD5 check of every file made optional.

    torchvision re-hashes the 160 MB of pickles at every start and rejects any other content,
    which also rules out small test data in the real format; presence is always checked, the
    hashes only with ``verify_checksums: true``.
    """

    class Checked(base):  # type: ignore[misc, valid-type]
        verify_checksums = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not self.verify_checksums:
                # torchvision's check_integrity skips the hash when md5 is None.
                self.train_list = [[name, None] for name, _ in base.train_list]
                self.test_list = [[name, None] for name, _ in base.test_list]
                self.meta = {**base.meta, "md5": None}
            super().__init__(*args, **kwargs)

    Checked.__name__ = base.__name__
    Checked.__qualname__ = base.__qualname__
    return Checked


CIFAR10 = _checked(torchvision.datasets.CIFAR10)
CIFAR100 = _checked(torchvision.datasets.CIFAR100)


class CIFARData(DataModule):
    """CIFAR-10 or CIFAR-100 (``name``), ``root`` holding the unpacked archive.

    ``pad_mode``: ``reflect`` (FFSD's) or ``zero`` (the baselines'), for both pipelines.
    """

    def __init__(
        self,
        *,
        root: str,
        download: bool,
        mean: list[float],
        std: list[float],
        pad: int,
        pad_mode: str = "reflect",
        verify_checksums: bool = False,
        **kwargs: Any,
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(
                f"dataset.pad_mode={pad_mode!r} is not valid; choose one of: {', '.join(PAD_MODES)}"
            )
        super().__init__(**kwargs)
        if self.name not in _LAYOUTS:
            raise ValueError(f"dataset.name={self.name!r}; CIFARData knows {sorted(_LAYOUTS)}")
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.mean, self.std, self.pad = tuple(mean), tuple(std), int(pad)
        self.pad_mode = pad_mode
        self.verify_checksums = bool(verify_checksums)
        base = CIFAR100 if self.name == "cifar100" else CIFAR10
        self._cls = type(base.__name__, (base,), {"verify_checksums": self.verify_checksums})

    def expected_files(self) -> list[Path]:
        folder, names = _LAYOUTS[self.name]
        return [self.root / folder / n for n in names]

    def check(self) -> None:
        missing = [p for p in self.expected_files() if not p.is_file()]
        if not missing:
            return
        if self.download:
            self._download()
            return
        folder = _LAYOUTS[self.name][0]
        raise DataNotFoundError(
            f"{self.name} not found under dataset.root={str(self.root)!r}: missing "
            f"{', '.join(str(p) for p in missing[:3])}{' ...' if len(missing) > 3 else ''}.\n"
            f"Expected layout: {self.root}/{folder}/{{{', '.join(_LAYOUTS[self.name][1])}}} "
            f"(the unpacked python version of the official archive).\n"
            f"Point dataset.root at it, or add dataset.download=true to fetch it (needs internet)."
        )

    def _download(self) -> None:
        try:
            self._cls(str(self.root), train=True, download=True)
        except (urllib.error.URLError, OSError) as err:
            raise DataNotFoundError(
                f"dataset.download=true but downloading {self.name} into {self.root} failed "
                f"({err}). Without internet, copy the unpacked archive there instead."
            ) from err

    supports_tensor_pipeline = True

    def memory_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.train_set if split == "train" else self.test_set
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32
        return images, torch.tensor(ds.targets, dtype=torch.long)

    def norm(self) -> tuple[list[float], list[float]]:
        return list(self.mean), list(self.std)

    def train_augment(self) -> Augment:
        return Augment(pad=self.pad, crop=self.image_size, flip=True, padding_mode=self.pad_mode)

    def train_transform(self) -> T.Compose:
        if self.pad_mode == "reflect":
            pad = T.Pad(self.pad, padding_mode="reflect")
        else:
            pad = T.Pad(self.pad, fill=0, padding_mode="constant")
        return T.Compose(
            [
                pad,
                T.RandomHorizontalFlip(),
                T.RandomCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def test_transform(self) -> T.Compose:
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _make(self, train: bool) -> Dataset:
        self.check()
        transform = self.train_transform() if train else self.test_transform()
        return self._cls(str(self.root), train=train, transform=transform, download=False)

    def build_train(self) -> Dataset:
        return self._make(True)

    def build_test(self) -> Dataset:
        return self._make(False)
