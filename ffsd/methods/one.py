"""ONE, On-the-fly Native Ensemble (``shared/baselines-spec.md`` section 3).

One backbone split by the spec's rule (``ffsd.models.branches``): the shared S0-S2 with output
x, and m branches (S3, S4, head) with logits z_i. A gate on x, global average pooling ->
Linear(c2 -> m) -> BatchNorm1d(m) -> ReLU -> softmax over the branches (the ReLU comes before
the softmax, quirk 3), weighs the branches' logits into the teacher z_e = Σ_i g_i · z_i
(section 3 (a)). With one optimiser over every parameter (section 3 (b)):

    L = Σ_i CE(z_i) + CE(z_e) + r_80(e) · Σ_i KLε_3(⟂z_e ‖ z_i),

T = 3 and ε = 1e-7 on the teacher's probabilities (quirks 1, 2), the ramp-up r_L with the
0-based epoch (quirk 4; first-epoch weight e^-5). z_e learns only through CE(z_e), which reaches
the gate, every branch and the shared stages; the KL terms train the branches and the shared
stages.

Switches (section 3, "Switches in ffsd"): ``detach_teacher`` (true; false is OKDDip's
``train_one.py``, where the KL also trains the gate and every branch), ``rampup_epochs`` (80; 0
is MCL-OKD's, weight 1 from the first epoch), ``kl_eps`` (1e-7; 0), ``num_branches`` (3),
``temperature`` (3). ``kl_weight`` and ``teacher_ce_weight`` (both 1) scale the KL terms and
CE(z_e); with both 0 ONE is exactly the "individual branches" variant (section 1), an ablation
check, not a reference setting.

Evaluation (section 3 (d)): ``branch{k}/top1`` (k from 0: ``branch0`` is the spec's branch 1),
``branch_mean/top1``, ``teacher/top1`` (z_e, the paper's ONE-E), ``ensemble/top1`` (the mean of
the branches' logits) and ``deploy/top1`` = ``branch0/top1``: the shared stages plus branch 0,
gate and other branches dropped, saved under the plain backbone's names.
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
from ffsd.methods.peers import PeerMethod, PeerNetworks
from ffsd.models.base import TapNet
from ffsd.models.branches import SPLIT_RULE, Branches
from ffsd.models.pool import global_pool


class Gate(nn.Module):
    """ONE's gate on the shared output: pool -> Linear -> BatchNorm1d -> ReLU -> softmax."""

    def __init__(self, channels: int, num_branches: int) -> None:
        super().__init__()
        # Names of the reference (``control_v1``, ``bn_v1``); PyTorch's default initialisation.
        self.control_v1 = nn.Linear(channels, num_branches)
        self.bn_v1 = nn.BatchNorm1d(num_branches)

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(F.relu(self.bn_v1(self.control_v1(global_pool(x)))), dim=1)


class ONENetworks(PeerNetworks):
    """The shared stages, m branches (``nets``) and the gate; ``forward`` is ONE's loss."""

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_branches: int,
        *,
        temperature: float,
        kl_eps: float,
        detach_teacher: bool,
        kl_weight: float,
        teacher_ce_weight: float,
    ) -> None:
        super().__init__(net_factory, num_classes, num_branches, SPLIT_RULE, member="branch")
        # The gate reads S2's output: 32 channels for the CIFAR ResNets, 32w for WRN-d-w.
        self.gate = Gate(self.nets[0].tap_channels[1], num_branches)
        self.temperature, self.kl_eps = float(temperature), float(kl_eps)
        self.detach_teacher = bool(detach_teacher)
        self.kl_weight, self.teacher_ce_weight = float(kl_weight), float(teacher_ce_weight)

    def outputs(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """(every branch's logits, the gated teacher z_e)."""
        branches: Branches = self.nets
        feats = branches.forward_features(images)
        z = [branches[k].classify(f[-1]) for k, f in enumerate(feats)]
        g = self.gate(feats[0][SPLIT_RULE - 1])  # S2's output, shared by every branch
        z_e = (g.unsqueeze(2) * torch.stack(z, 1)).sum(1)
        return z, z_e

    def eval_logits(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        z, z_e = self.outputs(images)
        return z, [z_e]

    def forward(
        self, images: Tensor, labels: Tensor, ramp: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z, z_e = self.outputs(images)
        t, eps = self.temperature, self.kl_eps
        terms: dict[str, Tensor] = {}
        teacher_ce = self.teacher_ce_weight * F.cross_entropy(z_e, labels)
        terms["teacher/ce"], terms["teacher/acc"] = teacher_ce, batch_accuracy(z_e, labels)
        total = teacher_ce
        for k, z_k in enumerate(z):
            ce = F.cross_entropy(z_k, labels)
            kd = (self.kl_weight * ramp) * L.kl_t(z_e, z_k, t, eps=eps, detach=self.detach_teacher)
            terms[f"branch{k}/ce"], terms[f"branch{k}/kd"] = ce, kd
            terms[f"branch{k}/loss"] = ce + kd
            terms[f"branch{k}/acc"] = batch_accuracy(z_k, labels)
            total = total + ce + kd
        return total, {k: v.detach() for k, v in terms.items()}


class ONE(PeerMethod):
    """``distill=one``: m >= 2 branches on shared S0-S2 with a gated teacher (section 3)."""

    member = "branch"
    extra_outputs = ("teacher",)
    count_key = "num_branches"
    branched = True

    def __init__(
        self,
        *,
        num_branches: int,
        temperature: float,
        kl_eps: float,
        detach_teacher: bool,
        rampup_epochs: int,
        kl_weight: float,
        teacher_ce_weight: float,
        deploy: int,
        **common: Any,
    ) -> None:
        self.options = {
            "temperature": temperature,
            "kl_eps": kl_eps,
            "detach_teacher": detach_teacher,
            "kl_weight": kl_weight,
            "teacher_ce_weight": teacher_ce_weight,
        }
        self.check_options(
            num_branches=num_branches, rampup_epochs=rampup_epochs, deploy=deploy, **self.options
        )
        self.rampup_epochs = int(rampup_epochs)
        super().__init__(num_networks=num_branches, deploy=deploy, **common)
        self.epoch_metrics = ("teacher/top1", "branch_mean/top1", "ensemble/top1")

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return ONENetworks(net, num_classes, self.num_networks, **self.options)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c = Checker(cfg)
        c.number(f"{key}.temperature", strict_low=0)
        c.choice(f"{key}.kl_eps", (L.KL_EPS, 0.0))
        c.boolean(f"{key}.detach_teacher")
        c.number(f"{key}.rampup_epochs", integer=True, low=0)
        c.number(f"{key}.kl_weight", low=0)
        c.number(f"{key}.teacher_ce_weight", low=0)
        return super().option_errors(cfg, key) + c.errors

    def ramp_weight(self, epoch: int) -> float:
        # r_80(e), constant within an epoch (baselines spec, "Ramp-up").
        return L.ramp_up(epoch, self.rampup_epochs)
