"""OKDDip, Online Knowledge Distillation with Diverse Peers (baselines spec, section 5).

K = m + 1 branches split by the spec's rule (``ffsd.models.branches``): the shared S0-S2, then
branches 0..m−1, the **auxiliary peers**, and branch m, the **group leader**, each with its own
S3, S4 and head (section 5 (a)). Two projections ``query_weight`` and ``key_weight``,
Linear(d → ⌊d/attn_factor⌋, no bias), shared by the peers and not applied to the leader, read
each peer's pooled feature h_i (the classifier input; d = 64 for the CIFAR ResNets, 64w for
WRN-d-w). With one optimiser over every parameter (section 5 (b)):

    a_ij = softmax_j(W_q h_i · W_k h_j)   over every peer j, i included, no 1/√d
    t_i  = Σ_j a_ij z_j                   (logits)
    z̄    = (1/m) Σ_j z_j                  (logits)
    L    = Σ_i CE(z_i) + CE(z_L) + α · r_80(e) · [Σ_i KLε_T(t_i ‖ z_i) + KLε_T(z̄ ‖ z_L)]

T = 3, α = 1, ε = 1e-7 on the targets' probabilities, the ramp-up r_L from the 0-based epoch
(constant within an epoch). **Nothing is detached**: through t_i the KL reaches every peer's
logits and, through a_ij, W_q, W_k and every h_j; that is the only gradient the projections
get, so detaching t_i would freeze the attention at its initialisation (section 5 (b)). The
leader's term also trains every peer through z̄ unless ``detach_leader_target``.

Switches (section 5 (e)): ``num_peers`` (3), ``temperature`` (3), ``alpha`` (1),
``rampup_epochs`` (80), ``attn_factor`` (8), ``kl_eps`` (1e-7 | 0: MCL-OKD's form),
``detach_leader_target`` (false), ``shared`` (true; false is the network-based ``--MulStu``
variant: K independent full networks with the same attention over their pooled features).

Evaluation (section 5 (d)): ``peer{i}/top1`` (i from 0), ``leader/top1``, ``peer_mean/top1`` and
``peer_std/top1``, ``ensemble/top1`` (the mean of the **peers'** logits, leader excluded, as
OKDDip's ``test_accTop1``), ``ensemble_all/top1`` (peers and leader, as MCL-OKD counts it),
``deploy/top1`` = ``leader/top1`` (the best checkpoint is chosen on it, as OKDDip's
``best.pth``) and ``dist``, OKDDip's diagnostic of the peers' diversity: per test sample, the sum
over peer pairs of the L2 distance between their softmax outputs (T = 1), divided by the number
of pairs m(m−1)/2 (the reference's hard-coded 3 is right only for m = 3, quirk table), averaged
over the test set. The deployed network is the shared stages plus the leader, under the plain
backbone's names (``shared/baselines-spec.md``, "Backbones as stage lists").
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ffsd import losses as L
from ffsd.config import Checker
from ffsd.methods.base import Reduce, _identity
from ffsd.methods.metrics import LogitCounts, batch_accuracy
from ffsd.methods.peers import PeerMethod, PeerNetworks, branching_errors
from ffsd.models.base import TapNet
from ffsd.models.branches import SPLIT_RULE, Branches
from ffsd.models.pool import global_pool


def attention_targets(
    features: Tensor, logits: Tensor, query: nn.Module, key: nn.Module
) -> tuple[Tensor, Tensor]:
    """(t, a): every peer's target t = a · z and the attention a, section 5 (b).

    ``features`` is B x m x d (the peers' pooled features h_j), ``logits`` B x m x C. a is
    B x m x m with a[b, i, j] = softmax over j of q_i · k_j, the softmax running over every
    peer, i itself included, without a 1/√d scale (the reference's ``energy``); t[b, i] =
    Σ_j a[b, i, j] z_j (the reference's ``x_m``). Nothing is detached.
    """
    energy = torch.bmm(query(features), key(features).transpose(1, 2))
    a = F.softmax(energy, dim=-1)
    return torch.bmm(a, logits), a


def feature_width(cfg: DictConfig) -> int | None:
    """d of ``cfg.model``: the width of its pooled feature (the classifier input), if known."""
    from hydra.utils import instantiate

    model = OmegaConf.select(cfg, "model.net")
    if model is None:
        return None
    # Built on the meta device: no memory and no initialisation, only the widths are read.
    with torch.device("meta"):
        net = instantiate(model, _partial_=True)(num_classes=2)
    return int(net.tap_channels[-1])


class OKDDipNetworks(PeerNetworks):
    """m peers and the leader (``nets``), the attention projections; ``forward`` is the loss."""

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_peers: int,
        *,
        temperature: float,
        alpha: float,
        kl_eps: float,
        attn_factor: int,
        detach_leader_target: bool,
        shared: bool,
    ) -> None:
        stages = SPLIT_RULE if shared else 0
        super().__init__(net_factory, num_classes, num_peers + 1, stages, member="peer")
        self.num_peers = int(num_peers)
        # d: every architecture's classifier reads the global pool of its last tap.
        d = self.nets[0].tap_channels[-1]
        width = d // int(attn_factor)
        # The reference's names; PyTorch's default Linear initialisation (section 5 (a)).
        self.query_weight = nn.Linear(d, width, bias=False)
        self.key_weight = nn.Linear(d, width, bias=False)
        self.temperature, self.alpha, self.kl_eps = float(temperature), float(alpha), float(kl_eps)
        self.detach_leader_target = bool(detach_leader_target)

    def last_features(self, images: Tensor) -> list[Tensor]:
        """Every branch's last feature map (the input of its head), peers first, leader last."""
        if isinstance(self.nets, Branches):  # each shared stage computed once
            return [f[-1] for f in self.nets.forward_features(images)]
        return [net.features(images)[-1] for net in self.nets]

    def outputs(self, images: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(every branch's logits, the peers' targets t as B x m x C, the attention a)."""
        maps = self.last_features(images)
        z = [net.classify(f) for net, f in zip(self.nets, maps, strict=True)]
        m = self.num_peers
        h = torch.stack([global_pool(f) for f in maps[:m]], 1)
        t, a = attention_targets(h, torch.stack(z[:m], 1), self.query_weight, self.key_weight)
        return z, t, a

    def forward(
        self, images: Tensor, labels: Tensor, ramp: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z, t, a = self.outputs(images)
        m, temp, eps = self.num_peers, self.temperature, self.kl_eps
        weight = self.alpha * ramp
        terms: dict[str, Tensor] = {}
        total = None
        for i in range(m):
            ce = F.cross_entropy(z[i], labels)
            # detach=False: the attention learns only through this target (section 5 (b)).
            kd = weight * L.kl_t(t[:, i], z[i], temp, eps=eps, detach=False)
            terms[f"peer{i}/ce"], terms[f"peer{i}/kd"] = ce, kd
            terms[f"peer{i}/loss"] = ce + kd
            terms[f"peer{i}/acc"] = batch_accuracy(z[i], labels)
            total = ce + kd if total is None else total + ce + kd
        z_leader, z_bar = z[m], torch.stack(z[:m]).mean(0)
        ce = F.cross_entropy(z_leader, labels)
        kd = weight * L.kl_t(z_bar, z_leader, temp, eps=eps, detach=self.detach_leader_target)
        terms["leader/ce"], terms["leader/kd"] = ce, kd
        terms["leader/loss"] = ce + kd
        terms["leader/acc"] = batch_accuracy(z_leader, labels)
        # How much a peer's target is its own logits: 1/m is uniform attention, 1 none at all.
        terms["attention/self"] = torch.diagonal(a, dim1=1, dim2=2).mean()
        return total + ce + kd, {k: v.detach() for k, v in terms.items()}


class OKDDip(PeerMethod):
    """``distill=okddip``: m >= 2 peers with attention targets and a group leader (section 5)."""

    member = "peer"
    count_key = "num_peers"

    def __init__(
        self,
        *,
        num_peers: int,
        temperature: float,
        alpha: float,
        kl_eps: float,
        rampup_epochs: int,
        attn_factor: int,
        detach_leader_target: bool,
        shared: bool,
        **common: Any,
    ) -> None:
        self.options = {
            "temperature": temperature,
            "alpha": alpha,
            "kl_eps": kl_eps,
            "attn_factor": attn_factor,
            "detach_leader_target": detach_leader_target,
            "shared": shared,
        }
        self.check_options(num_peers=num_peers, rampup_epochs=rampup_epochs, **self.options)
        self.num_peers = int(num_peers)
        self.rampup_epochs = int(rampup_epochs)
        # The leader is branch m, the last one (section 5 (a)), and the deployed network (d).
        super().__init__(num_networks=self.num_peers + 1, deploy=self.num_peers, **common)
        self.deploy_name = "leader"
        self.progress_terms = ("leader/loss", "leader/acc")
        self.epoch_metrics = ("leader/top1", "peer_mean/top1", "ensemble/top1")

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        return OKDDipNetworks(net, num_classes, self.num_peers, **self.options)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        # Not PeerMethod's: OKDDip has no ``deploy`` key, its deployed network is the leader.
        c = Checker(cfg)
        c.number(f"{key}.num_peers", integer=True, low=cls.min_networks)
        c.number(f"{key}.temperature", strict_low=0)
        c.number(f"{key}.alpha", low=0)
        c.choice(f"{key}.kl_eps", (L.KL_EPS, 0.0))
        c.number(f"{key}.rampup_epochs", integer=True, low=0)
        c.number(f"{key}.attn_factor", integer=True, low=1)
        c.boolean(f"{key}.detach_leader_target")
        c.boolean(f"{key}.shared")
        factor = c.get(f"{key}.attn_factor")
        d = feature_width(cfg)
        integer = isinstance(factor, int) and not isinstance(factor, bool)
        if d is not None and integer and factor > d:
            name = OmegaConf.select(cfg, "model.name")
            c.errors.append(
                f"{key}.attn_factor={factor!r} is not allowed: must be <= {d}, the pooled "
                f"feature width of model={name} (the projections map {d} -> {d}//factor)"
            )
        if c.get(f"{key}.shared") is True:
            c.errors += branching_errors(cfg, f"{key}.shared", True)
        return c.errors

    # -- state ---------------------------------------------------------------------------------
    def networks(self) -> dict[str, str]:
        m = self.num_peers
        return {f"peer{i}": f"nets.nets.{i}." for i in range(m)} | {"leader": f"nets.nets.{m}."}

    def describe(self) -> str:
        nets: OKDDipNetworks = self.nets
        attn = sum(p.numel() for p in (nets.query_weight.weight, nets.key_weight.weight))
        total = sum(p.numel() for p in nets.parameters())
        who = f"{self.num_peers} peers + leader"
        if isinstance(nets.nets, Branches):
            counts = nets.nets.parameter_counts()
            parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
            return f"{who} sharing S0-S2: {total:,} parameters ({parts}, attention {attn:,})"
        each = sum(p.numel() for p in nets.nets[0].parameters())
        return (
            f"{who}, independent networks: {total:,} parameters "
            f"({self.num_networks} x {each:,}, attention {attn:,})"
        )

    # -- schedule ------------------------------------------------------------------------------
    def ramp_weight(self, epoch: int) -> float:
        # r_80(e) from the 0-based epoch, constant within an epoch (baselines spec, "Ramp-up").
        return L.ramp_up(epoch, self.rampup_epochs)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable, reduce: Reduce = _identity) -> dict[str, float]:
        self.eval()
        m = self.num_peers
        peers = [f"peer{i}" for i in range(m)]
        counts = LogitCounts([*peers, "leader", "ensemble", "ensemble_all"], self.topk, self.device)
        # Σ over samples of the mean pairwise distance, and the sample count (section 5 (d)).
        # The plain L2 norm: nn.PairwiseDistance's eps 1e-6 added to each difference in the
        # reference moves this diagnostic by about 1e-6·√C, not worth reproducing.
        dist = torch.zeros(2, device=self.device, dtype=torch.float64)
        pairs = m * (m - 1) // 2
        for images, labels in loader:
            images, labels = self.prepare(images, labels)
            with self.autocast():
                z, _ = self.nets.eval_logits(images)
            z = [v.float() for v in z]
            stacked = torch.stack(z)
            counts.add([*z, stacked[:m].mean(0), stacked.mean(0)], labels)
            p = [F.softmax(v, dim=1) for v in z[:m]]
            per_sample = sum(
                torch.linalg.vector_norm(p[i] - p[j], dim=1)
                for i in range(m)
                for j in range(i + 1, m)
            )
            dist[0] += per_sample.double().sum() / pairs
            dist[1] += labels.numel()
        out = counts.result(reduce)
        dist = reduce(dist)
        out["dist"] = (dist[0] / dist[1]).item()
        for k in self.topk:
            per_peer = [out[f"peer{i}/top{k}"] for i in range(m)]
            out[f"peer_mean/top{k}"] = statistics.fmean(per_peer)
            out[f"peer_std/top{k}"] = statistics.stdev(per_peer)
            out[f"deploy/top{k}"] = out[f"leader/top{k}"]
        out["deploy/ce"] = out["leader/ce"]
        return out
