"""PCL, Peer Collaborative Learning (``shared/baselines-spec.md`` section 7).

The computation is shaoeric-PCL's, the only public reimplementation (no official code exists).

Live model (section 7 (a)): one backbone split by the spec's rule (``ffsd.models.branches``),
the shared S0-S2 and m peers (S3, S4, head) with logits z_i and pooled features f_i (width d:
64 for the CIFAR ResNets, 64w for WRN-d-w), and the peer ensemble classifier
``en_fc`` = Linear(m·d -> C): z_e = en_fc([f_1; ...; f_m]). Peer i's whole path, the shared stem
included, runs on view i of every sample (``views=per_peer``), so z_e combines features computed
on m different views.

Mean model: a second instance of the same networks (own initialisation, see below), never
trained by the optimiser; after every optimiser step θ̄ ← α_t θ̄ + (1 − α_t) θ with
α_t = min(1 − 1/(t+1), ema_decay), t the global step counted from 0, so the first update copies
the live weights. Parameters only: its BatchNorm buffers come from its own train-mode forward
passes, which give z̄_j on view j.

Loss (section 7 (b); one backward, one SGD over the live model):

    L = CE(z_e) + Σ_i [ CE(z_i) + w(e)·KL_T(⟂z_e ‖ z_i) + w(e)·(1/(m−1)) Σ_{j≠i} KL_T(⟂z̄_j ‖ z_i) ]

with T = 3, KL_T batchmean × T² (no ε), and w(e) = r_80(e) (``rampup_epochs``); ``rampup_bug``
reproduces the reimplementation's ramp. z_e learns only through CE(z_e), which reaches
``en_fc``, every peer and the shared stages.

Quirks (section 7 (e)):

* the mean model's first forward uses its own random initialisation (reproduced: it is built
  after the live model from the global generator, as shaoeric-PCL's ``main.py`` builds
  ``model`` then ``mean_model``, and the first EMA update comes after the first step);
* identical fc initialisation across peers (``tie_fc_init``, off by default: every peer is
  initialised independently);
* the ramp dividing by λ = 1 (``rampup_bug``, off by default);
* selection on the max over the EMA peers: not reproduced; ``deploy/top1`` is one EMA peer.

Evaluation (section 7 (d)): ``ema_peer{i}/top1`` (k from 0: ``ema_peer0`` is the spec's
peer 1), ``ema_ensemble/top1`` (mean of the EMA peers' logits), ``ema_peer_mean/top1``,
``peer{i}/top1``, ``peer_mean/top1``, ``ensemble/top1`` (the live peers), ``teacher/top1``
(z_e of the live model) and ``deploy/top1`` = ``ema_peer{deploy}/top1``: the EMA shared stages
plus EMA peer ``deploy`` (the paper's Algorithm 1 output), saved under the plain backbone's names.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from ffsd import losses as L
from ffsd.config import Checker
from ffsd.methods.base import Reduce, _identity
from ffsd.methods.metrics import LogitCounts, batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks
from ffsd.models.base import TapNet
from ffsd.models.branches import SPLIT_RULE, Branches
from ffsd.models.pool import global_pool

VIEWS = ("per_peer", "shared")


def ema_alpha(step: int, decay: float) -> float:
    """α_t = min(1 − 1/(t+1), decay), t counted from 0 (section 7 (a), ``update_ema_variables``).

    The true running mean until it would weigh the past more than ``decay`` (CuriousAI's mean
    teacher); α_0 = 0, so the first update is a copy of the live weights.
    """
    return min(1.0 - 1.0 / (step + 1), float(decay))


def pcl_rampup(epoch: int, length: int, bug: bool) -> float:
    """w(e): r_L(e) (baselines spec, "Ramp-up"), or with ``bug`` shaoeric-PCL's ramp.

    The reimplementation's ``compute_rampup_weight(epoch, lambd=1.0, alpha=80)`` (section 7 (b))
    returns λ·exp(−5(1 − e0/λ)²) for e0 ≤ L and λ after, dividing by λ = 1 instead of L:
    0.0067 at e = 1, 1 at e = 2, 0.0067 at e = 3, below 3e-9 for e = 4..L+1, 1 from e = L+2.
    """
    if not bug:
        return L.ramp_up(epoch, length)
    e0, lambd = epoch - 1, 1.0
    if e0 > length:
        return lambd
    return lambd * math.exp(-5.0 * (1.0 - e0 / lambd) ** 2)


def pcl_loss(
    z: Sequence[Tensor],
    z_e: Tensor,
    z_bar: Sequence[Tensor],
    labels: Tensor,
    weight: Tensor | float,
    temperature: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Section 7 (b)'s L and its terms, with ``weight`` = w(e) (terms returned with their graph).

    ``peer{i}/kd`` is the peer-ensemble term w·KL_T(⟂z_e ‖ z_i), ``peer{i}/pm`` the peer-mean
    term w·(1/(m−1)) Σ_{j≠i} KL_T(⟂z̄_j ‖ z_i) (shaoeric-PCL's ``PMLoss`` averages over the other
    peers); both targets are detached, so z_e learns from CE(z_e) alone.
    """
    m, t = len(z), temperature
    terms: dict[str, Tensor] = {}
    teacher_ce = F.cross_entropy(z_e, labels)
    terms["teacher/ce"], terms["teacher/acc"] = teacher_ce, batch_accuracy(z_e, labels)
    total = teacher_ce
    for i, z_i in enumerate(z):
        ce = F.cross_entropy(z_i, labels)
        kd = weight * L.kl_t(z_e, z_i, t)
        pm = weight * (sum(L.kl_t(z_bar[j], z_i, t) for j in range(m) if j != i) / (m - 1))
        terms[f"peer{i}/ce"], terms[f"peer{i}/kd"], terms[f"peer{i}/pm"] = ce, kd, pm
        terms[f"peer{i}/loss"] = ce + kd + pm
        terms[f"peer{i}/acc"] = batch_accuracy(z_i, labels)
        total = total + ce + kd + pm
    return total, terms


class PCLNetworks(PeerNetworks):
    """The shared stages, m peers (``nets``) and ``en_fc``; ``forward`` is PCL's loss.

    The mean model is a second instance of this class: only its peers' logits are used (its
    ``en_fc`` is carried along, as in the reimplementation, and follows the EMA like the rest).
    """

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_peers: int,
        *,
        temperature: float,
        tie_fc_init: bool,
    ) -> None:
        super().__init__(net_factory, num_classes, num_peers, SPLIT_RULE, member="peer")
        branches: Branches = self.nets
        if tie_fc_init:
            # shaoeric-PCL deep-copies branch 1 before its init loop, which re-draws the convs
            # but not the Linear layers (section 7 (a), Init): every peer's head starts as peer 0's.
            for name in type(branches[0]).head_modules:
                for k in range(1, num_peers):
                    getattr(branches[k], name).load_state_dict(
                        getattr(branches[0], name).state_dict()
                    )
        # d = the pooled width of the last stage (64 ResNet, 64w WRN); PyTorch's default Linear
        # initialisation, as the reimplementation's init loop leaves Linear layers alone.
        width = branches[0].tap_channels[-1]
        self.en_fc = nn.Linear(num_peers * width, num_classes)
        self.temperature = float(temperature)

    def outputs(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """(every peer's logits z_i, the ensemble logits z_e); peer i on view i of a 5-d batch."""
        branches: Branches = self.nets
        feats = branches.forward_features(images)
        z = [branches[k].classify(f[-1]) for k, f in enumerate(feats)]
        z_e = self.en_fc(torch.cat([global_pool(f[-1]) for f in feats], 1))
        return z, z_e

    def eval_logits(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        z, z_e = self.outputs(images)
        return z, [z_e]

    def forward(
        self, images: Tensor, labels: Tensor, weight: Tensor, z_bar: list[Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z, z_e = self.outputs(images)
        total, terms = pcl_loss(z, z_e, z_bar, labels, weight, self.temperature)
        return total, {k: v.detach() for k, v in terms.items()}


class PCL(PeerMethod):
    """``distill=pcl``: m >= 2 peers on shared S0-S2, a peer-ensemble classifier and an EMA copy."""

    member = "peer"
    count_key = "num_peers"
    branched = True

    def __init__(
        self,
        *,
        num_peers: int,
        temperature: float,
        ema_decay: float,
        rampup_epochs: int,
        rampup_bug: bool,
        tie_fc_init: bool,
        views: str,
        deploy: int,
        **common: Any,
    ) -> None:
        self.options = {"temperature": temperature, "tie_fc_init": tie_fc_init}
        self.check_options(
            num_peers=num_peers,
            ema_decay=ema_decay,
            rampup_epochs=rampup_epochs,
            rampup_bug=rampup_bug,
            views=views,
            deploy=deploy,
            **self.options,
        )
        self.ema_decay = float(ema_decay)
        self.rampup_epochs, self.rampup_bug = int(rampup_epochs), bool(rampup_bug)
        # Section 7 (a): peer i trains on view i of each sample (the dataset emits m views).
        self.num_views = int(num_peers) if views == "per_peer" else 1
        super().__init__(num_networks=num_peers, deploy=deploy, **common)
        # Built after the live model from the global generator: its own draw of the
        # initialisation, which the first step's mean-teacher targets come from (quirk 4).
        self.ema = self.build_networks(common["net"], self.num_classes).to(self.device)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        live, mean = list(self.nets.parameters()), list(self.ema.parameters())
        if [p.shape for p in live] != [p.shape for p in mean]:  # pragma: no cover - a bug guard
            raise RuntimeError("the mean model's parameters do not pair with the live model's")
        #: Optimiser steps taken so far: the t of α_t, saved in the run state.
        self.ema_step = 0
        self.deploy_name = f"ema_peer{self.deploy}"
        self.progress_terms = (
            f"peer{self.deploy}/loss",
            f"peer{self.deploy}/acc",
            f"ema_peer{self.deploy}/acc",
        )
        self.epoch_metrics = ("teacher/top1", "ema_ensemble/top1", "ema_peer_mean/top1")

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return PCLNetworks(net, num_classes, self.num_networks, **self.options)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c = Checker(cfg)
        c.number(f"{key}.temperature", strict_low=0)
        c.number(f"{key}.ema_decay", low=0, high=1)
        c.number(f"{key}.rampup_epochs", integer=True, low=0)
        c.boolean(f"{key}.rampup_bug")
        c.boolean(f"{key}.tie_fc_init")
        c.choice(f"{key}.views", VIEWS)
        return super().option_errors(cfg, key) + c.errors

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        # The mean model is state, not an optimised network: in the checkpoints, not the optimiser.
        return {"nets": self.nets, "ema": self.ema}

    def deploy_model(self) -> nn.Module:
        # Algorithm 1's target model: the EMA shared stages plus EMA peer ``deploy``.
        return self.ema.nets[self.deploy]

    def networks(self) -> dict[str, str]:
        m = self.num_networks
        return {f"peer{k}": f"nets.nets.{k}." for k in range(m)} | {
            f"ema_peer{k}": f"ema.nets.{k}." for k in range(m)
        }

    def describe(self) -> str:
        counts = self.nets.nets.parameter_counts()
        parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
        en_fc = sum(p.numel() for p in self.nets.en_fc.parameters())
        total = sum(p.numel() for p in self.nets.parameters())
        ema = sum(p.numel() for p in self.ema.parameters())
        return (
            f"{self.num_networks} peers sharing stages: {total:,} trainable parameters ({parts}, "
            f"en_fc {en_fc:,}); mean (EMA) model: {ema:,} parameters, not trained"
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ema_step"] = self.ema_step
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema_step = int(state["ema_step"])

    # -- training ------------------------------------------------------------------------------
    def ramp_weight(self, epoch: int) -> float:
        # w(e), constant within an epoch (baselines spec, "Ramp-up"; section 7 (b)).
        return pcl_rampup(epoch, self.rampup_epochs, self.rampup_bug)

    @torch.no_grad()
    def update_mean_model(self) -> float:
        """θ̄ ← α_t θ̄ + (1 − α_t) θ over the parameters (not the buffers); returns α_t."""
        alpha = ema_alpha(self.ema_step, self.ema_decay)
        mean, live = list(self.ema.parameters()), list(self.nets.parameters())
        torch._foreach_mul_(mean, alpha)
        torch._foreach_add_(mean, live, alpha=1.0 - alpha)
        self.ema_step += 1
        return alpha

    def step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        images, labels = self._start_step(images, labels, epoch)
        if not self.ema.training:
            self.ema.train()  # its BN statistics come from these train-mode passes
        # The mean model outside forward_fn: forward_fn holds exactly the optimised parameters,
        # as data parallelism needs, and z̄ enters it as a detached input.
        with torch.no_grad(), self.autocast():
            z_bar = self.ema.logits(images)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            total, terms = self.forward_fn(images, labels, self._ramp, z_bar)
        total.backward()
        self.optimizer.step()
        # Section 7 (a): after every optimiser step.
        self.update_mean_model()
        for j, zb in enumerate(z_bar):
            terms[f"ema_peer{j}/acc"] = batch_accuracy(zb, labels)
        return terms

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable, reduce: Reduce = _identity) -> dict[str, float]:
        self.eval()
        m = self.num_networks
        live = [f"peer{i}" for i in range(m)]
        mean = [f"ema_peer{i}" for i in range(m)]
        names = [*live, "ensemble", "teacher", *mean, "ema_ensemble"]
        counts = LogitCounts(names, self.topk, self.device)
        for images, labels in loader:
            images, labels = self.prepare(images, labels)
            with self.autocast():
                z, z_e = self.nets.outputs(images)
                z_bar = self.ema.logits(images)
            ens = torch.stack(z).float().mean(0)
            ema_ens = torch.stack(z_bar).float().mean(0)
            counts.add([*z, ens, z_e, *z_bar, ema_ens], labels)
        out = counts.result(reduce)
        for k in self.topk:
            for prefix, group in (("peer", live), ("ema_peer", mean)):
                per = [out[f"{n}/top{k}"] for n in group]
                out[f"{prefix}_mean/top{k}"] = statistics.fmean(per)
                out[f"{prefix}_std/top{k}"] = statistics.stdev(per)
            out[f"deploy/top{k}"] = out[f"{self.deploy_name}/top{k}"]
        out["deploy/ce"] = out[f"{self.deploy_name}/ce"]
        return out
