"""Independent training (``shared/baselines-spec.md`` section 1): K networks, no distillation.

The "baseline" row of every online-distillation table: L_k = CE(z_k), each network on its own
(section 1 (b)). The K networks of one run see the same batches with one SGD each, which equals
K runs that share the data order and differ in initialisation (section 1 (c)). Deploy any one
network and report the mean over k, not the max (section 1 (d)); ``ensemble/top1`` is the
reference for the other methods' ensembles.

``shared_stages: 3`` is the spec's "individual branches" variant (``DefangChen/OKDDip:
train_one.py --ind``, the "ONE without distillation or gate" ablation): one copy of S0-S2 shared
by K branches (S3, S4, head), L = Σ_k CE(z_k), the shared layers receiving the sum of the
branches' gradients; its metrics are ``branch{k}/top1``, and it needs a CIFAR ResNet or WRN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from ffsd.config import Checker
from ffsd.methods.metrics import batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks, branching_errors
from ffsd.models.base import TapNet
from ffsd.models.branches import SPLIT_RULE


class IndependentNetworks(PeerNetworks):
    """K networks; ``forward`` is Σ_k CE(z_k) (section 1 (b)), with ``net{k}/{ce,loss,acc}``."""

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        total = labels.new_zeros((), dtype=images.dtype)
        for k, z in enumerate(self.logits(images)):
            ce = F.cross_entropy(z, labels)
            terms[f"{self.member}{k}/ce"] = terms[f"{self.member}{k}/loss"] = ce
            terms[f"{self.member}{k}/acc"] = batch_accuracy(z, labels)
            total = total + ce
        return total, {k: v.detach() for k, v in terms.items()}


class Independent(PeerMethod):
    """``distill=independent``: K >= 1 independently trained copies of the backbone."""

    min_networks = 1

    def __init__(
        self, *, num_networks: int, shared_stages: int, deploy: int, **common: Any
    ) -> None:
        self.check_options(num_networks=num_networks, shared_stages=shared_stages, deploy=deploy)
        self.shared_stages = int(shared_stages)
        self.member = "branch" if self.shared_stages else "net"
        super().__init__(num_networks=num_networks, deploy=deploy, **common)

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return IndependentNetworks(
            net, num_classes, self.num_networks, self.shared_stages, self.member
        )

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c = Checker(cfg)
        c.choice(f"{key}.shared_stages", (0, SPLIT_RULE))
        if c.get(f"{key}.shared_stages") == SPLIT_RULE:
            c.errors += branching_errors(cfg, f"{key}.shared_stages", SPLIT_RULE)
        return super().option_errors(cfg, key) + c.errors
