"""Independent training (``shared/baselines-spec.md`` section 1): K networks, no distillation.

The "baseline" row of every online-distillation table: L_k = CE(z_k), each network on its own
(section 1 (b)). The K networks of one run see the same batches with one SGD each, which equals
K runs that share the data order and differ in initialisation (section 1 (c)). Deploy any one
network and report the mean over k, not the max (section 1 (d)); ``ensemble/top1`` is the
reference for the other methods' ensembles.

The spec's "individual branches" variant (shared S0-S2, K branches) needs the backbones as stage
lists and is a multi-branch method; it is not part of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ffsd.methods.metrics import batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks
from ffsd.models.base import TapNet


class IndependentNetworks(PeerNetworks):
    """K networks; ``forward`` is Σ_k CE(z_k) (section 1 (b)), with ``net{k}/{ce,loss,acc}``."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        total = labels.new_zeros((), dtype=images.dtype)
        for k, z in enumerate(self.logits(images)):
            ce = F.cross_entropy(z, labels)
            terms[f"net{k}/ce"] = terms[f"net{k}/loss"] = ce
            terms[f"net{k}/acc"] = batch_accuracy(z, labels)
            total = total + ce
        return total, {k: v.detach() for k, v in terms.items()}


class Independent(PeerMethod):
    """``distill=independent``: K >= 1 independently trained copies of the backbone."""

    min_networks = 1

    def __init__(self, *, num_networks: int, deploy: int, **common: Any) -> None:
        self.check_options(num_networks=num_networks, deploy=deploy)
        super().__init__(num_networks=num_networks, deploy=deploy, **common)

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return IndependentNetworks(net, num_classes, self.num_networks)
