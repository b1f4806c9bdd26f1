"""Batches cut and augmented as whole tensors, from a dataset held in memory (on the GPU on CUDA).

The released code augments CIFAR one PIL image at a time in DataLoader workers. Here the training
set lives as one uint8 tensor (N x C x H x W) on the training device, and each batch is gathered,
augmented and normalized with a handful of tensor ops: reflect-pad, horizontal flip and random
crop (spec, "Data (CIFAR)") become a single gather whose indices encode each image's crop offset
and flip.

For the same offsets and flips the result is identical to torchvision's PIL path
(Pad(reflect) -> RandomHorizontalFlip -> RandomCrop -> ToTensor -> Normalize); see
tests/test_tensor_pipeline.py. Offsets and flips are drawn for the whole epoch at its start from a
generator seeded by (seed, epoch), so an epoch, or the rest of one, replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """CIFAR's train-time augmentation parameters: reflect padding, crop size, flip."""

    pad: int
    crop: int
    flip: bool = True


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


def crop_flip(padded: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Gather B crops from B padded images (B x C x P x P) at per-image rows/cols (B x crop)."""
    b = torch.arange(padded.size(0), device=padded.device)
    # Advanced indexing over (batch, row, col) puts the index dims first: B x crop x crop x C.
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
    ) -> None:
        device = images.device
        self.images, self.labels = images, labels
        self.order = torch.as_tensor(indices, dtype=torch.long).to(device)
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=device).view(shape) if mean is not None else None
        self.std = torch.tensor(std, device=device).view(shape) if std is not None else None
        self.augment = augment
        n = len(self.order)
        if augment is not None:
            side = images.shape[-1] + 2 * augment.pad
            # Drawn for the whole epoch up front: skipping batches leaves later draws unchanged.
            self.offsets = torch.randint(
                0, side - augment.crop + 1, (n, 2), generator=generator, device=device
            )
            if augment.flip:
                self.flips = torch.rand(n, generator=generator, device=device) < 0.5
            else:
                self.flips = torch.zeros(n, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return max(0, -(-len(self.order) // self.batch_size) - self.start_batch)

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        idx = self.order[sl]
        x = self.images[idx]
        if self.augment is not None:
            a = self.augment
            rows, cols = augment_indices(
                self.offsets[sl], self.flips[sl], x.shape[-1] + 2 * a.pad, a.crop
            )
            x = crop_flip(reflect_pad(x, a.pad), rows, cols)
        if x.dtype == torch.uint8:
            x = normalize(x, self.mean, self.std)
        return x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        total = -(-len(self.order) // self.batch_size)
        for k in range(self.start_batch, total):
            yield self.batch(k)
