"""What the methods of K independent networks share: the networks, one optimizer, the evaluation.

Independent training, DML and KDCL (``shared/baselines-spec.md`` sections 1, 2 and 6) train K
full copies of the backbone, each initialised independently with the backbone's own
initialisation, with no shared parameters. :class:`PeerNetworks` holds them, and a subclass's
``forward`` computes every loss term of one iteration, so one backward over the sum updates
every network (the losses touch disjoint parameters and every cross-network target is detached,
so this equals a backward and step per network; a method whose targets are not detached, DML
with ``detach=false``, optimises the sum, as its reference does).

One SGD with one parameter group per network gives exactly the update of one SGD per network
with the same hyper-parameters (baselines spec, "Reference protocols": momentum, Nesterov and
weight decay are element-wise).

Evaluation (baselines spec, "Metric names"): ``net{k}/top<k>`` and ``net{k}/ce`` of every
network, ``net_mean/top<k>`` and ``net_std/top<k>`` (mean and sample standard deviation over the
networks; the std needs K >= 2), ``ensemble/top<k>`` (argmax of the mean of the networks'
logits, never an oracle) and ``deploy/top<k>`` (the deployed network, ``net{deploy}``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ffsd.config import Checker
from ffsd.methods.base import OnlineMethod, Reduce, _identity
from ffsd.methods.metrics import LogitCounts
from ffsd.models.base import TapNet
from ffsd.models.branches import Branches
from ffsd.schedules import Schedule


def branching_errors(cfg: DictConfig, key: str, value: Any) -> list[str]:
    """Why ``cfg.model`` cannot share stages between networks (``key=value`` asked for it)."""
    from hydra.utils import instantiate

    model = OmegaConf.select(cfg, "model.net")
    if model is None:
        return []
    # Built on the meta device: no memory, no initialisation, only the class is needed.
    with torch.device("meta"):
        net = instantiate(model, _partial_=True)(num_classes=2)
    if type(net).stage_modules is None:
        name = OmegaConf.select(cfg, "model.name")
        return [
            f"{key}={value!r} shares backbone stages, which the baselines spec defines for the "
            f"CIFAR ResNets and WRNs only, not model={name}; choose model=resnet20, resnet32, "
            "resnet56, wrn16_2, wrn40_2 or wrn28_10"
        ]
    return []


class PeerNetworks(nn.Module):
    """K independently initialised copies of one backbone, ``nets.<k>.*``; subclasses add the loss.

    ``forward(images, labels)`` returns (sum of every loss, dict of detached terms); ``images``
    is B x C x H x W, or views x B x C x H x W for a method with ``num_views > 1`` (network k
    then trains on view k).
    """

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_networks: int,
        shared_stages: int = 0,
        member: str = "net",
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.num_networks = int(num_networks)
        self.member = member
        # Built one after another from the global generator: each copy gets its own draw of the
        # backbone's initialisation (the engine seeds that generator from trainer.seed).
        if shared_stages or groups is not None:
            # The networks share their first stages (baselines spec, "Backbones as stage lists"):
            # independent training's "individual branches", DML's MCL-OKD stem; or stages per
            # group of branches (``groups``, CL-ILR's hierarchy).
            self.nets: nn.ModuleList = Branches(
                net_factory, num_classes, num_networks, shared_stages=shared_stages, groups=groups
            )
        else:
            self.nets = nn.ModuleList(
                net_factory(num_classes=num_classes, leader=False, num_students=num_networks)
                for _ in range(num_networks)
            )

    def eval_logits(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(every network's logits, the method's extra outputs) for evaluation."""
        return self.logits(images), []

    def logits(self, images: Tensor) -> list[Tensor]:
        """Every network's logits; network k on view k of a views x B x ... batch."""
        if isinstance(self.nets, Branches):  # each shared stage computed once
            return self.nets(images)
        if images.dim() == 5:
            return [net(images[k]).logits for k, net in enumerate(self.nets)]
        return [net(images).logits for net in self.nets]


class PeerMethod(OnlineMethod):
    """Base of the K-network methods: optimizer, learning-rate schedule, evaluation, state.

    Subclasses set ``min_networks``, build their :class:`PeerNetworks` subclass in
    :meth:`build_networks` and may override :meth:`step`.
    """

    #: Fewest networks the method is defined for (baselines spec, each section's (a)).
    min_networks = 2
    #: Whether the networks always share backbone stages (ONE, CL-ILR, PCL): only architectures
    #: with a stage list are accepted, checked with the count key's options.
    branched = False
    #: The ``distill`` key that holds the network count (ONE calls them branches).
    count_key = "num_networks"
    #: The optimizer group of ``cfg.optim`` that trains the networks.
    optim_group = "networks"
    #: What the metric and network names call a network: ``net`` (``net0/top1``), or ``branch``
    #: for networks that share stages (baselines spec, "Metric names").
    member = "net"
    #: Names of further evaluated outputs (``PeerNetworks.eval_logits``), e.g. ONE's teacher.
    extra_outputs: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        net: Callable[..., TapNet],
        optim: Mapping[str, Callable[..., torch.optim.Optimizer]],
        schedule: Schedule,
        num_classes: int,
        num_networks: int,
        deploy: int,
        topk: Sequence[int] = (1,),
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device)
        self.num_networks = int(num_networks)
        self.num_classes = int(num_classes)
        self.deploy = int(deploy)
        self.deploy_name = f"{self.member}{self.deploy}"
        self.progress_terms = (f"{self.deploy_name}/loss", f"{self.deploy_name}/acc")
        self.epoch_metrics = (f"{self.member}_mean/top1", "ensemble/top1")
        self.topk = tuple(sorted({int(k) for k in topk}))
        self.schedule = schedule
        self.nets = self.build_networks(net, num_classes).to(self.device)
        # One group per network; a stage shared by several networks belongs to the first (the
        # optimizers act per parameter, so the grouping does not change the update).
        # A method's own modules beyond the networks (ONE's gate) form one more group.
        seen: set[int] = set()
        groups = []
        for n in [*self.nets.nets, self.nets]:
            own = [p for p in n.parameters() if id(p) not in seen]
            seen.update(id(p) for p in own)
            if own or n is not self.nets:
                groups.append({"params": own})
        self.optimizer = optim[self.optim_group](groups)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.forward_fn = self.nets
        self._ramp: Tensor | None = None

    def build_networks(self, net: Callable[..., TapNet], num_classes: int) -> PeerNetworks:
        """The method's networks and loss; subclasses return their :class:`PeerNetworks`."""
        raise NotImplementedError

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c = Checker(cfg)
        c.number(f"{key}.{cls.count_key}", integer=True, low=cls.min_networks)
        k = c.get(f"{key}.{cls.count_key}")
        if isinstance(k, int) and not isinstance(k, bool):
            c.number(f"{key}.deploy", integer=True, low=0, high=k - 1)
        if cls.branched:
            c.errors += branching_errors(cfg, f"{key}.{cls.count_key}", k)
        return c.errors

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"nets": self.nets}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"networks": self.optimizer}

    def deploy_model(self) -> nn.Module:
        # Any single network can be deployed; the spec reports the mean over k, not the max.
        return self.nets.nets[self.deploy]

    def networks(self) -> dict[str, str]:
        return {f"{self.member}{k}": f"nets.nets.{k}." for k in range(self.num_networks)}

    def describe(self) -> str:
        nets = self.nets.nets
        if isinstance(nets, Branches):
            counts = nets.parameter_counts()
            parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
            total = sum(p.numel() for p in self.nets.parameters())
            if total > counts["total"]:  # the method's own modules (ONE's gate)
                parts += f", other {total - counts['total']:,}"
            k = self.num_networks
            what = "branches" if self.member == "branch" else "networks"
            return f"{k} {what} sharing stages: {total:,} parameters ({parts})"
        return super().describe()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["num_networks"] = self.num_networks
        return state

    # -- schedule ------------------------------------------------------------------------------
    def ramp_weight(self, epoch: int) -> float | None:
        """The distillation weight of epoch ``epoch``, constant within it, or None for a method
        without a ramp-up. With a weight, ``forward_fn`` gets it as a third argument (a 0-d
        tensor on the device, so changing it recompiles nothing)."""
        return None

    def ramp(self) -> float:
        """The current epoch's ramp-up weight (1 for a method without one)."""
        return 1.0 if self._ramp is None else float(self._ramp)

    def begin_epoch(self, epoch: int, batches_per_epoch: int | None = None) -> None:
        super().begin_epoch(epoch, batches_per_epoch)
        self._set_lrs(epoch, 0)
        w = self.ramp_weight(epoch)
        self._ramp = None if w is None else torch.tensor(w, dtype=torch.float32, device=self.device)

    def _set_lrs(self, epoch: int, it: int) -> None:
        progress = (it + 1) / self._batches_per_epoch if self._batches_per_epoch else 1.0
        factor = self.schedule.factor(epoch - 1, progress, warmup=True)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def learning_rates(self) -> dict[str, float]:
        return {"lr/networks": self.optimizer.param_groups[0]["lr"]}

    # -- training ------------------------------------------------------------------------------
    def _start_step(self, images: Tensor, labels: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        if self._epoch != epoch:
            self.begin_epoch(epoch)
        if self.schedule.warmup_epochs and epoch <= self.schedule.warmup_epochs:
            self._set_lrs(epoch, self._iter)
        self._iter += 1
        if not self.nets.training:
            self.nets.train()
        return self.prepare(images, labels)

    def step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        images, labels = self._start_step(images, labels, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        ramp = () if self._ramp is None else (self._ramp,)
        with self.autocast():
            total, terms = self.forward_fn(images, labels, *ramp)
        total.backward()
        self.optimizer.step()
        return terms

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable, reduce: Reduce = _identity) -> dict[str, float]:
        self.eval()
        k_nets = self.num_networks
        m = self.member
        names = [*(f"{m}{k}" for k in range(k_nets)), "ensemble", *self.extra_outputs]
        counts = LogitCounts(names, self.topk, self.device)
        for images, labels in loader:
            images, labels = self.prepare(images, labels)
            with self.autocast():
                z, extra = self.nets.eval_logits(images)
            counts.add([*z, torch.stack(z).float().mean(0), *extra], labels)
        out = counts.result(reduce)
        for k in self.topk:
            per_net = [out[f"{m}{i}/top{k}"] for i in range(k_nets)]
            out[f"{m}_mean/top{k}"] = statistics.fmean(per_net)
            if k_nets > 1:
                out[f"{m}_std/top{k}"] = statistics.stdev(per_net)
            out[f"deploy/top{k}"] = out[f"{m}{self.deploy}/top{k}"]
        out["deploy/ce"] = out[f"{m}{self.deploy}/ce"]
        return out
