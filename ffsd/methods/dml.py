"""DML, Deep Mutual Learning (``shared/baselines-spec.md`` section 2).

ffsd's default (section 2, "ffsd default and switches"): K independent networks, each learning
from the labels and from every peer,

    L_k = CE(z_k) + (1/(K−1)) Σ_{l≠k} KL_T(⟂z_l ‖ z_k),   T = 1,

stepped jointly after one forward on the batch (one backward of Σ_k L_k; the losses touch
disjoint parameters, so this equals separate backwards). With T = 2 and K = 2 this is exactly
FFSD's common-student term.

Switches, each reproducing a reference (section 2's table):

* ``temperature``: 1 (official TF code), 2 (MCL-OKD), 3 (OKDDip);
* ``target``: ``pairwise`` (default) or ``mean_of_peers``: one target per network, the mean of
  the peers' *logits* z̄_{−k} (OKDDip's default);
* ``detach``: true (default), or false: the targets carry gradient into the peers, so every KL
  also pulls the peer toward the student (OKDDip);
* ``reduction``: ``mean`` over peers, 1/(K−1) (default), or ``sum`` (official TF code);
* ``kl_eps``: 0 (default) or 1e-7, KLε_T (OKDDip);
* ``alpha``: weight of the mutual term, 1 (every reference); 0 reduces DML exactly to
  independent training, a check rather than a reference setting;
* ``update``: ``joint`` (default) or ``alternating``, the paper's Algorithm 1 *(unverified)*: on
  one batch, for k = 1..K, forward every network with its current weights, then step network k
  alone (K forwards per batch; each peer forward runs in training mode, so it also advances the
  peer's BatchNorm running statistics, as recomputing the predictions does). The official code's
  fresh batch per network is a side effect of TF queues and is not reproduced.

* ``share_stem``: false (default), or ``layer1``: MCL-OKD's networks share ``conv1``, ``bn1``,
  ``layer1`` (stages S0-S1) and each keeps its own ``layer2``, ``layer3`` and classifier (CIFAR
  ResNets and WRNs); the shared stem receives every network's gradient, with ``update=joint``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from ffsd import losses as L
from ffsd.config import Checker
from ffsd.methods.metrics import batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks, branching_errors
from ffsd.models.base import TapNet

TARGETS = ("pairwise", "mean_of_peers")
REDUCTIONS = ("mean", "sum")
UPDATES = ("joint", "alternating")


class DMLNetworks(PeerNetworks):
    """K networks; ``forward`` is Σ_k L_k, with ``net{k}/{ce,kd,loss,acc}``."""

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_networks: int,
        *,
        temperature: float,
        target: str,
        detach: bool,
        reduction: str,
        kl_eps: float,
        alpha: float,
        shared_stages: int,
    ) -> None:
        super().__init__(net_factory, num_classes, num_networks, shared_stages)
        self.temperature, self.target, self.detach = float(temperature), target, bool(detach)
        self.reduction, self.kl_eps, self.alpha = reduction, float(kl_eps), float(alpha)

    def mutual_loss(self, k: int, logits: list[Tensor], *, detach: bool | None = None) -> Tensor:
        """Network k's KL term against its peers (section 2, "ffsd default and switches")."""
        detach = self.detach if detach is None else detach
        t, eps, z_k = self.temperature, self.kl_eps, logits[k]
        peers = [z for i, z in enumerate(logits) if i != k]
        if self.target == "mean_of_peers":
            # OKDDip's "ensemble first": the mean of the peers' logits, one KL per network.
            kl = L.kl_t(torch.stack(peers).mean(0), z_k, t, eps=eps, detach=detach)
        else:
            kl = sum(L.kl_t(z_l, z_k, t, eps=eps, detach=detach) for z_l in peers)
            if self.reduction == "mean":
                kl = kl / len(peers)
        return self.alpha * kl

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(images)
        terms: dict[str, Tensor] = {}
        total = None
        for k, z in enumerate(logits):
            ce = F.cross_entropy(z, labels)
            kd = self.mutual_loss(k, logits)
            terms[f"{self.member}{k}/ce"], terms[f"{self.member}{k}/kd"] = ce, kd
            terms[f"{self.member}{k}/loss"] = ce + kd
            terms[f"{self.member}{k}/acc"] = batch_accuracy(z, labels)
            total = ce + kd if total is None else total + ce + kd
        return total, {k: v.detach() for k, v in terms.items()}

    def network_loss(self, k: int, images: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        """L_k alone, the peers run with their current weights and no gradient (Algorithm 1)."""
        with torch.no_grad():
            peers = [
                net(images[i] if images.dim() == 5 else images).logits if i != k else None
                for i, net in enumerate(self.nets)
            ]
        z = self.nets[k](images[k] if images.dim() == 5 else images).logits
        logits = [z if i == k else p for i, p in enumerate(peers)]
        ce = F.cross_entropy(z, labels)
        kd = self.mutual_loss(k, logits, detach=True)
        terms = {
            f"{self.member}{k}/ce": ce,
            f"{self.member}{k}/kd": kd,
            f"{self.member}{k}/loss": ce + kd,
            f"{self.member}{k}/acc": batch_accuracy(z, labels),
        }
        return ce + kd, {n: v.detach() for n, v in terms.items()}


class DML(PeerMethod):
    """``distill=dml``: K >= 2 networks learning mutually (baselines spec section 2)."""

    def __init__(
        self,
        *,
        num_networks: int,
        temperature: float,
        target: str,
        detach: bool,
        reduction: str,
        kl_eps: float,
        alpha: float,
        share_stem: Any,
        update: str,
        deploy: int,
        **common: Any,
    ) -> None:
        losses = {
            "temperature": temperature,
            "target": target,
            "detach": detach,
            "reduction": reduction,
            "kl_eps": kl_eps,
            "alpha": alpha,
        }
        self.check_options(
            num_networks=num_networks, share_stem=share_stem, update=update, deploy=deploy, **losses
        )
        # MCL-OKD's stem: conv1, bn1, layer1 are stages S0-S1.
        self.options = losses | {"shared_stages": 2 if share_stem == "layer1" else 0}
        self.update = update
        super().__init__(num_networks=num_networks, deploy=deploy, **common)

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return DMLNetworks(net, num_classes, self.num_networks, **self.options)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        errors = super().option_errors(cfg, key)
        c = Checker(cfg)
        c.number(f"{key}.temperature", strict_low=0)
        c.choice(f"{key}.target", TARGETS)
        c.boolean(f"{key}.detach")
        c.choice(f"{key}.reduction", REDUCTIONS)
        c.choice(f"{key}.kl_eps", (0.0, L.KL_EPS))
        c.number(f"{key}.alpha", low=0)
        c.choice(f"{key}.update", UPDATES)
        c.choice(f"{key}.share_stem", (False, "layer1"))
        if c.get(f"{key}.share_stem") == "layer1":
            c.errors += branching_errors(cfg, f"{key}.share_stem", "layer1")
            if c.get(f"{key}.update") == "alternating":
                c.errors.append(
                    f"{key}.update='alternating' steps one network at a time, which a shared "
                    f"stem does not allow ({key}.share_stem='layer1'); choose: joint"
                )
        return errors + c.errors

    def distribute(self, wrap_ddp: Callable[[nn.Module], nn.Module]) -> None:
        if self.update == "alternating":
            # Each of the K updates of one batch trains one network: a single DDP wrapper over
            # all of them would see unused parameters at every backward.
            raise ValueError(
                "distill.update=alternating trains one network per backward and runs in one "
                "process only; use distill.update=joint for data-parallel runs"
            )
        super().distribute(wrap_ddp)

    def step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        if self.update == "joint":
            return super().step(images, labels, epoch)
        images, labels = self._start_step(images, labels, epoch)
        terms: dict[str, Tensor] = {}
        for k in range(self.num_networks):
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss, got = self.nets.network_loss(k, images, labels)
            loss.backward()
            # Only network k has gradients (its peers ran under no_grad); the optimizer skips
            # parameters without one, so this is network k's own step.
            self.optimizer.step()
            terms |= got
        return terms
