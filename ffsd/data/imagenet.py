"""ImageNet (or any ImageFolder data) from ``root/train/<class>/*`` and ``root/val/<class>/*``.

Transforms per the spec ("Data"): train random-resized crop 224 + horizontal flip, test resize
256 + center crop 224, both normalized with the ImageNet mean and std.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from ffsd.data.base import DataModule, DataNotFoundError

# torchvision is imported where it is used: its import pulls torch._dynamo, seconds per process
# that every run and task without an ImageFolder dataset would pay for nothing.
if TYPE_CHECKING:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder


class ImageFolderData(DataModule):
    def __init__(
        self,
        *,
        root: str,
        mean: list[float],
        std: list[float],
        resize: int,
        train_dir: str = "train",
        val_dir: str = "val",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize = int(resize)
        self.dirs = {"train": self.root / train_dir, "val": self.root / val_dir}

    def check(self) -> None:
        for path in self.dirs.values():
            if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
                raise DataNotFoundError(
                    f"{self.name}: no class folders in {path} (dataset.root={str(self.root)!r}).\n"
                    f"Expected layout: {self.root}/{{train,val}}/<class name>/<image files>, "
                    f"the same class folders in both (torchvision ImageFolder). "
                    f"ImageNet cannot be downloaded automatically; set dataset.root."
                )

    def build_train(self) -> Dataset:
        import torchvision.transforms as T

        self.check()
        transform = T.Compose(
            [
                T.RandomResizedCrop(self.image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
        return self._folder("train", transform)

    def build_test(self) -> Dataset:
        import torchvision.transforms as T

        self.check()
        transform = T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
        return self._folder("val", transform)

    def _folder(self, split: str, transform: T.Compose) -> ImageFolder:
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(self.dirs[split]), transform=transform)
        if len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{self.dirs[split]} holds {len(ds.classes)} class folders but "
                f"dataset.num_classes={self.num_classes}; set dataset.num_classes to match"
            )
        return ds
