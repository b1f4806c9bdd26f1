"""CIFAR-10/100 from the standard python-pickle layout, read by :mod:`ffsd.data.cifar_files`.

Layout under ``root``: ``cifar-100-python/{train,test,meta}`` or
``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (what the official archives
unpack to). Augmentation per the spec ("Data (CIFAR)"): reflect-pad 4 -> random horizontal flip
-> random 32x32 crop -> to [0, 1] -> normalize; test: to [0, 1] -> normalize. With
``pipeline: tensor`` the same augmentation runs on whole uint8 batches on the training device.

``pad_mode: zero`` pads with black pixels instead, the baselines' ``RandomCrop(32, padding=4)``
(ONE, OKDDip, MCL-OKD, shaoeric-PCL/KDCL; ``shared/baselines-spec.md`` "Reference protocols").
They crop before flipping; the flip of a uniformly placed crop is the crop of the flipped
padding, so pad -> flip -> crop draws the same distribution of images.

The files are never given to ``pickle.load`` (torchvision's CIFAR classes do, and a planted file
would run code): :mod:`ffsd.data.cifar_files` checks them against the official checksums
(``verify_checksums``) and unpickles them with an allow-list that can build data only. A split is
held as torchvision's classes hold it (``data`` N x 32 x 32 x 3 uint8, ``targets``, ``classes``),
and items are transformed PIL images as there.
"""

from __future__ import annotations

import functools
import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ffsd.config import ConfigError
from ffsd.data.base import DataModule, DataNotFoundError
from ffsd.data.tensor_pipeline import PAD_MODES, Augment

# torchvision (and cifar_files, which reads its MD5 lists) is imported where it is used: its
# import pulls torch._dynamo, seconds per process that every run and task without a CIFAR dataset
# (digits, synthetic, eval of an exported model) would pay for nothing.
if TYPE_CHECKING:
    import torchvision.transforms as T

#: name -> (folder, train files, test files, meta file, labels key, meta key, classes): what the
#: official archives unpack to.
_LAYOUTS = {
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
    ),
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
}
_ARCHIVES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # torchvision.datasets' classes


@functools.cache
def split_class() -> type:
    """``CIFARSplit``, a torchvision ``VisionDataset``: defined on first use, as torchvision is
    imported (see the imports)."""
    from torchvision.datasets import VisionDataset

    class CIFARSplit(VisionDataset):
        """One split in memory: ``data`` (N x 32 x 32 x 3 uint8), ``targets``, ``classes``; item
        i is ``(transform(PIL image), label)``, as in torchvision's CIFAR classes."""

        def __init__(
            self,
            root: Path,
            data: np.ndarray,
            targets: list[int],
            classes: list[str],
            transform=None,
        ) -> None:
            super().__init__(str(root), transform=transform)
            self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision
            self.targets = targets
            self.classes = classes

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, index: int) -> tuple[Any, int]:
            image = Image.fromarray(self.data[index])
            if self.transform is not None:
                image = self.transform(image)
            return image, self.targets[index]

    return CIFARSplit


class CIFARData(DataModule):
    """CIFAR-10 or CIFAR-100 (``name``), ``root`` holding the unpacked archive.

    ``pad_mode``: ``reflect`` (FFSD's) or ``zero`` (the baselines'), for both pipelines.
    ``verify_checksums``: compare each file with the official archive's MD5 before reading it.
    """

    def __init__(
        self,
        *,
        root: str,
        download: bool,
        mean: list[float],
        std: list[float],
        pad: int,
        verify_checksums: bool,
        pad_mode: str = "reflect",
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
        if not isinstance(verify_checksums, bool):
            raise ConfigError(
                f"dataset.verify_checksums={verify_checksums!r} must be true (the official "
                "files) or false (custom files)"
            )
        self.verify_checksums = verify_checksums

    def expected_files(self) -> list[Path]:
        folder, train, test, meta, *_ = _LAYOUTS[self.name]
        return [self.root / folder / n for n in (*train, *test, meta)]

    def check(self) -> None:
        missing = [p for p in self.expected_files() if not p.is_file()]
        if not missing:
            return
        if self.download:
            self._download()
            return
        folder = _LAYOUTS[self.name][0]
        names = ", ".join(p.name for p in self.expected_files())
        raise DataNotFoundError(
            f"{self.name} not found under dataset.root={str(self.root)!r}: missing "
            f"{', '.join(str(p) for p in missing[:3])}{' ...' if len(missing) > 3 else ''}.\n"
            f"Expected layout: {self.root}/{folder}/{{{names}}} "
            f"(the unpacked python version of the official archive).\n"
            f"Point dataset.root at it, or add dataset.download=true to fetch it (needs internet)."
        )

    def _download(self) -> None:
        import torchvision.datasets
        from torchvision.datasets.utils import download_and_extract_archive

        archive = getattr(torchvision.datasets, _ARCHIVES[self.name])
        try:
            # The archive's own MD5 is always checked; its files are then read as any others.
            download_and_extract_archive(
                archive.url, str(self.root), filename=archive.filename, md5=archive.tgz_md5
            )
        except (urllib.error.URLError, OSError, RuntimeError) as err:
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
        import torchvision.transforms as T

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
        import torchvision.transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _make(self, train: bool) -> Dataset:
        from ffsd.data import cifar_files

        self.check()
        folder, train_files, test_files, meta, labels_key, names_key, classes = _LAYOUTS[self.name]
        paths = [self.root / folder / n for n in (train_files if train else test_files)]
        meta_path = self.root / folder / meta
        if self.verify_checksums:
            for path in (*paths, meta_path):
                cifar_files.verify(path, self.name)
        batches = [cifar_files.read_batch(p, labels_key, classes) for p in paths]
        return split_class()(
            self.root,
            np.concatenate([data for data, _ in batches]),
            [y for _, labels in batches for y in labels],
            cifar_files.read_names(meta_path, names_key, classes),
            transform=self.train_transform() if train else self.test_transform(),
        )

    def build_train(self) -> Dataset:
        return self._make(True)

    def build_test(self) -> Dataset:
        return self._make(False)
