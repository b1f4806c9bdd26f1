"""Batches cut and augmented as whole tensors, from a dataset held in memory (on the GPU on CUDA).

The released code augments CIFAR one PIL image at a time in DataLoader workers. Here the training
set lives as one uint8 tensor (N x C x H x W) on the training device, and each batch is gathered,
augmented and normalized with a handful of tensor ops: padding (reflect, FFSD's, spec "Data
(CIFAR)"; or zero, the baselines' ``RandomCrop(32, padding=4)``, ``shared/baselines-spec.md``
"Reference protocols"), horizontal flip and random crop become a single gather whose indices
encode each image's crop offset and flip.

For the same offsets and flips the result is identical to torchvision's PIL path
(Pad(reflect or constant 0) -> RandomHorizontalFlip -> RandomCrop -> ToTensor -> Normalize); see
tests/test_tensor_pipeline.py. Offsets and flips are drawn for the whole epoch at its start from a
generator seeded by (seed, epoch, rank), so an epoch, or the rest of one, replays exactly.

With ``views = K > 1`` (KDCL and PCL, ``shared/baselines-spec.md`` sections 6 (a) and 7 (a):
network k sees its own augmentation of each sample) every batch is K x B x C x H x W: view v of
sample i is an independent draw of the same augmentation. View 0 is drawn first, exactly as a
1-view epoch draws, so view 0 of a K-view epoch is the 1-view epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``Augment.padding_mode`` choices: FFSD's reflect padding, or the baselines' zero padding.
PAD_MODES = ("reflect", "zero")


@dataclass(frozen=True)
class Augment:
    """CIFAR's train-time augmentation parameters: padding, crop size, flip.

    ``padding_mode`` is ``reflect`` (FFSD, spec "Data (CIFAR)") or ``zero`` (pixel value 0
    before normalization, as ``RandomCrop(32, padding=4)`` of ONE/OKDDip/MCL-OKD/PCL/KDCL,
    ``shared/baselines-spec.md`` "Reference protocols").
    """

    pad: int
    crop: int
    flip: bool = True
    padding_mode: str = "reflect"

    def __post_init__(self) -> None:
        if self.padding_mode not in PAD_MODES:
            raise ValueError(
                f"padding_mode={self.padding_mode!r} is not valid; "
                f"choose one of: {', '.join(PAD_MODES)}"
            )


def normalize(images_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std, in the order ToTensor and Normalize use."""
    return images_u8.float().div_(255).sub_(mean).div_(std)


def augment_indices(
    offsets: Tensor, flips: Tensor, padded: int, crop: int
) -> tuple[Tensor, Tensor]:
    """Row and column indices into the padded images for pad -> flip -> crop.

    ``offsets`` is B x 2 (top, left) in the padded (possibly flipped) image and ``flips`` B
    booleans. Flipping the padded image then cropping columns [left, left + crop) reads the
    unflipped padded columns padded - 1 - (left + c).
    """
    ar = torch.arange(crop, device=offsets.device)
    rows = offsets[:, :1] + ar  # B x crop
    cols = offsets[:, 1:] + ar
    cols = torch.where(flips[:, None], padded - 1 - cols, cols)
    return rows, cols


def crop_flip(padded: Tensor, rows: Tensor, cols: Tensor, source: Tensor | None = None) -> Tensor:
    """Gather crops from padded images (B x C x P x P) at per-crop rows/cols (M x crop).

    Crop m reads image ``source[m]`` (default: crop m of image m, M = B); several crops of one
    image (K views) then cost one gather and no copy of the padded batch.
    """
    b = torch.arange(padded.size(0), device=padded.device) if source is None else source
    # Advanced indexing over (batch, row, col) puts the index dims first: M x crop x crop x C.
    out = padded.permute(0, 2, 3, 1)[b[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def reflect_pad(images_u8: Tensor, pad: int) -> Tensor:
    """Reflect-pad uint8 images (as torchvision's Pad(padding_mode='reflect'))."""
    if pad == 0:
        return images_u8
    # reflection_pad2d has no uint8 kernel on every device; index instead (exact for any dtype).
    h, w = images_u8.shape[-2:]
    device = images_u8.device

    def reflect(n: int) -> Tensor:
        idx = torch.arange(-pad, n + pad, device=device).abs()
        return torch.where(idx >= n, 2 * (n - 1) - idx, idx)

    return images_u8[..., reflect(h)[:, None], reflect(w)[None, :]]


def zero_pad(images_u8: Tensor, pad: int) -> Tensor:
    """Zero-pad images (as torchvision's Pad(padding_mode='constant', fill=0) on raw pixels)."""
    return F.pad(images_u8, (pad, pad, pad, pad)) if pad else images_u8


def pad_images(images_u8: Tensor, pad: int, mode: str) -> Tensor:
    """Pad by ``pad`` on every side, ``mode`` one of :data:`PAD_MODES`."""
    return reflect_pad(images_u8, pad) if mode == "reflect" else zero_pad(images_u8, pad)


class TensorBatches:
    """One epoch of (images, labels) batches from in-memory tensors.

    Args:
        images: N x C x H x W uint8 (raw pixels) or float (already normalized) tensor.
        labels: N int64 labels, on the same device.
        indices: the order of this rank's samples for the epoch (e.g. a DistributedSampler's).
        batch_size: images per batch (the last batch may be smaller).
        mean, std: per-channel normalization for uint8 images (ignored for float images).
        augment: train-time augmentation, or ``None``.
        generator: draws the epoch's crop offsets and flips (on the images' device).
        start_batch: skip this many batches (resuming mid-epoch) without changing the rest.
        views: augmented views per sample. 1: batches are B x C x H x W. K > 1: K x B x C x H x W,
            view v an independent draw of ``augment`` (``shared/baselines-spec.md`` 6 (a), 7 (a));
            without ``augment`` the K views are K identical copies.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Sequence[int] | Tensor,
        batch_size: int,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
        generator: torch.Generator | None = None,
        start_batch: int = 0,
        views: int = 1,
    ) -> None:
        if int(views) < 1:
            raise ValueError(f"views={views!r} must be >= 1")
        device = images.device
        self.images, self.labels = images, labels
        self.order = torch.as_tensor(indices, dtype=torch.long).to(device)
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)
        self.views = int(views)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) if mean is not None else None
        self.std = torch.tensor(std, device=device).view(shape) if std is not None else None
        self.augment = augment
        n = len(self.order)
        if augment is not None:
            side = images.shape[-1] + 2 * augment.pad
            offsets, flips = [], []
            # Drawn for the whole epoch up front: skipping batches leaves later draws unchanged.
            # View 0 first, in a 1-view epoch's order, so that it is the 1-view epoch.
            for _ in range(self.views):
                offsets.append(
                    torch.randint(
                        0, side - augment.crop + 1, (n, 2), generator=generator, device=device
                    )
                )
                if augment.flip:
                    flips.append(torch.rand(n, generator=generator, device=device) < 0.5)
                else:
                    flips.append(torch.zeros(n, dtype=torch.bool, device=device))
            # views x N x 2 and views x N.
            self.offsets = torch.stack(offsets) if self.views > 1 else offsets[0][None]
            self.flips = torch.stack(flips) if self.views > 1 else flips[0][None]

    def __len__(self) -> int:
        return max(0, -(-len(self.order) // self.batch_size) - self.start_batch)

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        idx = self.order[sl]
        x = self.images[idx]
        v = self.views
        if self.augment is not None:
            a = self.augment
            side = x.shape[-1] + 2 * a.pad
            padded = pad_images(x, a.pad, a.padding_mode)
            if v == 1:
                rows, cols = augment_indices(self.offsets[0, sl], self.flips[0, sl], side, a.crop)
                x = crop_flip(padded, rows, cols)
            else:
                # All views in one gather, view-major: crop v * B + i reads image i.
                rows, cols = augment_indices(
                    self.offsets[:, sl].flatten(0, 1), self.flips[:, sl].flatten(), side, a.crop
                )
                source = torch.arange(len(idx), device=x.device).repeat(v)
                x = crop_flip(padded, rows, cols, source).unflatten(0, (v, len(idx)))
        if x.dtype == torch.uint8:
            x = normalize(x, self.mean, self.std)
        if v > 1 and self.augment is None:
            # Copies rather than an expanded view, so a method may modify one view in place.
            x = x.unsqueeze(0).repeat(v, *([1] * x.dim()))
        return x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        total = -(-len(self.order) // self.batch_size)
        for k in range(self.start_batch, total):
            yield self.batch(k)
