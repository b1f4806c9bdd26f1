"""CL-ILR, collaborative learning with intermediate-level representation sharing
(``shared/baselines-spec.md`` section 4).

K heads grown from one backbone split at its stages (``ffsd.models.branches``). Two forms, both
reimplementations (no official code exists, section 4):

* **Form A** (default; ``winycg/MCL-OKD:main_cifar_cl_ilr.py``, section 4 "Form A"),
  ``sharing=hierarchical``: S0-S1 shared by all heads, S2 in G = ⌈K/2⌉ copies (copy g feeds
  heads 2g and 2g+1; the last feeds one head when K is odd), S3 (+ S4 for a WRN, the split
  rule) and the classifier per head. ILR(s), identity forward and gradient × s backward, sits on
  the S1 output (s = 1/2 whatever G is: quirk 1) and on every S2 copy that feeds two heads
  (s = 1/2): ``ilr_scale=mcl_okd``. The loss, with the consensus z̃_h = ⟂((1/(K−1)) Σ_{j≠h} z_j)
  (a mean of logits, detached), is

      L = Σ_h [ β·CE(z_h) + (1 − β)·KL_T(z̃_h ‖ z_h) ],   β = 0.5, T = 2, no ramp-up.

* **Form B** (``DefangChen/OKDDip:train_one.py --avg --bpscale``, section 4 "Form B"),
  ``distill=cl_ilr_flat``: S0-S2 shared by all K heads, ILR(1/K) on the S2 output
  (``ilr_scale=per_children`` on flat sharing), the consensus *not* detached, and

      L = Σ_h CE(z_h) + α·r_80(e)·Σ_h KLε_3(z̃_h ‖ z_h)   (``beta: null``, α = 1, ε = 1e-7).

In general L = Σ_h [ w·CE(z_h) + α·r(e)·w'·KL(z̃_h ‖ z_h) ] with (w, w') = (β, 1 − β), or
(1, 1) for ``beta: null``; ``alpha``, ``rampup_epochs``, ``detach`` and ``kl_eps`` are free, so
either form's terms can be mixed for ablations.

``ilr_scale=per_children`` scales every split point by 1/(the number of stage modules that read
it), the rule the paper's "backpropagation rescaling" implies (*unverified*, quirk 1); it
coincides with ``mcl_okd`` for K = 3 and 4. ``ilr_scale=none`` turns the rescaling off.

Evaluation (section 4 (d)): ``branch{h}/top1`` of every head, ``branch_mean/top1`` and a correct
``ensemble/top1`` over all K heads (quirk 2, the reimplementation's 3-of-4 ensemble, is not
reproduced); ``deploy/top1`` = ``branch{deploy}/top1``, the head with its own path (S0, S1, its S2
copy, its S3 and head), saved under the plain backbone's names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from ffsd import losses as L
from ffsd.config import Checker
from ffsd.methods.metrics import batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks
from ffsd.models.base import TapNet
from ffsd.models.branches import SPLIT_RULE, Branches

SHARINGS = ("hierarchical", "flat")
ILR_SCALES = ("mcl_okd", "per_children", "none")
#: S0..S4 of "Backbones as stage lists" (a ResNet's S4 is empty).
STAGES = 5


class ILR(torch.autograd.Function):
    """Identity forward, gradient × ``scale`` backward (section 4 (a), MCL-OKD's ``ILR``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def ilr(x: Tensor, scale: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``scale`` on the way back (identity if 1)."""
    return x if scale == 1 else ILR.apply(x, scale)


def sharing_groups(sharing: str, num_heads: int) -> list[list[int]]:
    """Per stage S0..S4 (the spec's stage list), each head's group; a group shares the stage."""
    own = list(range(num_heads))
    if sharing == "flat":  # Form B: the split rule's S0-S2
        return [[0] * num_heads if s < SPLIT_RULE else own for s in range(STAGES)]
    # Form A: S0, S1 for all heads; S2 copy g for heads 2g, 2g+1; S3, S4 per head.
    return [[0] * num_heads, [0] * num_heads, [h // 2 for h in own], own, own]


def ilr_factor(rule: str, stage: int, consumers: int) -> float:
    """The gradient scale on stage ``stage``'s output, read by ``consumers`` distinct modules."""
    if rule == "none":
        return 1.0
    if rule == "mcl_okd":
        # MCL-OKD: 1/2 on S1's output whatever G is (quirk 1), 1/2 on an S2 copy with two heads.
        return 0.5 if stage == 1 or (stage == 2 and consumers == 2) else 1.0
    return 1.0 / consumers


def consensus(logits: list[Tensor]) -> list[Tensor]:
    """z̃_h = (1/(K−1)) Σ_{j≠h} z_j for every head h: the leave-one-out mean of logits."""
    total = torch.stack(logits).sum(0)
    k = len(logits)
    return [(total - z) / (k - 1) for z in logits]


class CLILRNetworks(PeerNetworks):
    """K heads sharing stages per ``sharing`` (``nets``); ``forward`` is CL-ILR's loss."""

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_heads: int,
        *,
        sharing: str,
        ilr_scale: str,
        beta: float | None,
        alpha: float,
        temperature: float,
        kl_eps: float,
        detach: bool,
    ) -> None:
        super().__init__(
            net_factory,
            num_classes,
            num_heads,
            member="branch",
            groups=sharing_groups(sharing, num_heads),
        )
        self.ilr_scale, self.beta, self.alpha = ilr_scale, beta, float(alpha)
        self.temperature, self.kl_eps, self.detach = float(temperature), float(kl_eps), detach

    def scale(self, stage: int, out: Tensor, consumers: int) -> Tensor:
        return ilr(out, ilr_factor(self.ilr_scale, stage, consumers))

    def logits(self, images: Tensor) -> list[Tensor]:
        branches: Branches = self.nets
        feats = branches.forward_features(images, hook=self.scale)
        return [branches[h].classify(f[-1]) for h, f in enumerate(feats)]

    def forward(
        self, images: Tensor, labels: Tensor, ramp: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.logits(images)
        # Form A's β·CE + (1 − β)·KL (α = 1, no ramp); Form B's CE + α·r(e)·KL (beta null).
        ce_w = 1.0 if self.beta is None else self.beta
        kd_w = self.alpha * ramp * (1.0 if self.beta is None else 1.0 - self.beta)
        terms: dict[str, Tensor] = {}
        total = labels.new_zeros((), dtype=z[0].dtype)
        for h, (z_h, t_h) in enumerate(zip(z, consensus(z), strict=True)):
            ce = F.cross_entropy(z_h, labels)
            kd = L.kl_t(t_h, z_h, self.temperature, eps=self.kl_eps, detach=self.detach)
            loss = ce_w * ce + kd_w * kd
            terms[f"branch{h}/ce"], terms[f"branch{h}/kd"] = ce, kd
            terms[f"branch{h}/loss"], terms[f"branch{h}/acc"] = loss, batch_accuracy(z_h, labels)
            total = total + loss
        return total, {k: v.detach() for k, v in terms.items()}


class CLILR(PeerMethod):
    """``distill=cl_ilr``: K >= 2 heads with hierarchical (or flat) sharing and ILR (section 4)."""

    member = "branch"
    count_key = "num_branches"
    branched = True

    def __init__(
        self,
        *,
        num_branches: int,
        sharing: str,
        ilr_scale: str,
        beta: float | None,
        alpha: float,
        temperature: float,
        kl_eps: float,
        detach: bool,
        rampup_epochs: int,
        deploy: int,
        **common: Any,
    ) -> None:
        self.options = {
            "sharing": sharing,
            "ilr_scale": ilr_scale,
            "beta": beta,
            "alpha": alpha,
            "temperature": temperature,
            "kl_eps": kl_eps,
            "detach": detach,
        }
        self.check_options(
            num_branches=num_branches, rampup_epochs=rampup_epochs, deploy=deploy, **self.options
        )
        self.rampup_epochs = int(rampup_epochs)
        super().__init__(num_networks=num_branches, deploy=deploy, **common)

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return CLILRNetworks(net, num_classes, self.num_networks, **self.options)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c = Checker(cfg)
        c.choice(f"{key}.sharing", SHARINGS)
        c.choice(f"{key}.ilr_scale", ILR_SCALES)
        if c.get(f"{key}.sharing") == "flat" and c.get(f"{key}.ilr_scale") == "mcl_okd":
            c.errors.append(
                f"{key}.ilr_scale='mcl_okd' is MCL-OKD's rule for hierarchical sharing; with "
                f"{key}.sharing='flat' choose per_children (Form B's 1/K) or none"
            )
        if c.get(f"{key}.beta") is not None:
            c.number(f"{key}.beta", low=0, high=1)
        c.number(f"{key}.alpha", low=0)
        c.number(f"{key}.temperature", strict_low=0)
        c.choice(f"{key}.kl_eps", (L.KL_EPS, 0.0))
        c.boolean(f"{key}.detach")
        c.number(f"{key}.rampup_epochs", integer=True, low=0)
        return super().option_errors(cfg, key) + c.errors

    def ramp_weight(self, epoch: int) -> float:
        # Form B's r_80(e), constant within an epoch (baselines spec, "Ramp-up"); 1 for Form A.
        return L.ramp_up(epoch, self.rampup_epochs)

    def describe(self) -> str:
        groups = self.nets.nets.groups
        copies = len(set(groups[2]))
        return f"{super().describe()}; S2 in {copies} cop{'y' if copies == 1 else 'ies'}"
