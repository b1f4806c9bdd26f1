"""Accuracy bookkeeping the methods share: top-k hits, and evaluation counts summed on the device.

Counts stay on the device while a loader is read and come to the host once, after ``reduce``
sums them over the ranks (exact metrics of the whole test set in a data-parallel run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ffsd.methods.base import Reduce


def batch_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 of one training batch in percent, a 0-d tensor (no host sync)."""
    return (logits.argmax(1) == labels).float().mean() * 100.0


def topk_hits(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> Tensor:
    """B x len(ks) booleans: is the label among the top-k predictions, for each k."""
    maxk = min(max(ks), logits.size(1))
    top = logits.topk(maxk, dim=1).indices == labels[:, None]
    return torch.stack([top[:, : min(k, maxk)].any(1) for k in ks], 1)


class LogitCounts:
    """Correct top-k counts and summed cross-entropy of named logits over a test loader."""

    def __init__(self, names: Sequence[str], ks: Sequence[int], device: torch.device) -> None:
        self.names, self.ks = list(names), tuple(ks)
        self.correct = torch.zeros(len(names), len(ks), device=device, dtype=torch.float64)
        self.ce = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    def add(self, logits: Sequence[Tensor], labels: Tensor) -> None:
        """One batch: ``logits[i]`` are the outputs named ``names[i]``."""
        for row, z in enumerate(logits):
            self.correct[row] += topk_hits(z, labels, self.ks).sum(0)
            self.ce[row] += F.cross_entropy(z.float(), labels, reduction="sum")
        self.count += labels.numel()

    def result(self, reduce: Reduce) -> dict[str, float]:
        """``<name>/top<k>`` (percent) and ``<name>/ce`` (mean), summed over ranks first."""
        n = self.correct.numel()
        packed = reduce(torch.cat([self.correct.flatten(), self.ce, self.count.reshape(1)]))
        total = packed[-1].item()
        if total == 0:
            raise ValueError("evaluate() got an empty loader")
        acc = (packed[:n].reshape(self.correct.shape) * 100.0 / total).tolist()
        ce = (packed[n:-1] / total).tolist()
        out: dict[str, float] = {}
        for row, name in enumerate(self.names):
            for col, k in enumerate(self.ks):
                out[f"{name}/top{k}"] = acc[row][col]
            out[f"{name}/ce"] = ce[row]
        return out
