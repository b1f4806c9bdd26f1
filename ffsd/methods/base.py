"""The interface between the engine and an online-distillation method.

The engine knows nothing about students, leaders or decoders: it calls ``begin_epoch``, ``step``
per batch, ``evaluate`` once per epoch and ``state_dict``/``load_state_dict`` for checkpoints. A
new method (independent students, DML, ONE, ...) subclasses :class:`OnlineMethod`, gets a
``conf/distill/<name>.yaml`` whose ``_target_`` names it, and runs under the same engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ffsd.config import ConfigError

#: Sums a tensor over all processes (DDP); identity in a single process.
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class OnlineMethod(ABC):
    """What the engine drives. Subclasses own their networks, optimizers and schedules.

    Besides the abstract methods, a subclass states what the engine shows and keeps, so that
    the engine, the tracker and the tasks need no method-specific code:

    * ``primary_metric``: the ``evaluate`` metric whose best value picks the best checkpoint,
      the deploy network's top-1;
    * ``deploy_name``: the name of the deployed network; the best one is saved as
      ``checkpoints/model_<deploy_name>_best.pth`` in the release's format;
    * ``progress_terms`` and ``epoch_metrics``: the training terms on the progress bar and the
      test metrics on each epoch's log line;
    * ``num_views``: independently augmented views of each sample the method trains on; with
      more than one, ``step`` gets images of shape ``views x B x C x H x W``;
    * :meth:`networks`: where each evaluable network's weights sit in :meth:`state_dict`, so
      ``task=eval``/``task=export`` can take any of them out of a run state.
    """

    primary_metric: str = "deploy/top1"
    deploy_name: str = "net0"
    progress_terms: tuple[str, ...] = ()
    epoch_metrics: tuple[str, ...] = ("ensemble/top1",)
    num_views: int = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        #: What ``step`` calls for the forward pass and the losses: a module whose forward takes
        #: a batch and returns (total loss, terms). Runtime wrappers replace it via
        #: ``wrap_forward`` (DDP first, then ``torch.compile``).
        self.forward_fn: Callable[..., Any] = self._no_forward
        #: Memory format of the networks and their inputs (``set_memory_format``).
        self.memory_format = torch.contiguous_format
        #: dtype of mixed-precision autocast around forward passes, or None for plain fp32.
        self.autocast_dtype: torch.dtype | None = None
        self._epoch: int | None = None
        self._batches_per_epoch: int | None = None
        self._iter = 0

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        """Every problem of this method's options, the node ``cfg.<key>``, one line each.

        Called by the config validation before any work starts (``cfg`` the composed config,
        ``key`` = ``distill``), so each line names the key (``distill.<option>``), the bad value
        and what is allowed. The default accepts anything.
        """
        return []

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Raise :class:`ConfigError` with :meth:`option_errors` of ``options`` (constructors)."""
        errors = cls.option_errors(OmegaConf.create({"distill": options}), "distill")
        if errors:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    @staticmethod
    def _no_forward(*_: Any) -> Any:
        raise NotImplementedError("this method sets forward_fn in its constructor")

    def wrap_forward(self, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``forward_fn`` by ``wrapper(forward_fn)``.

        Wrappers compose in call order: ``wrap_forward(DDP)`` then ``wrap_forward(torch.compile)``
        gives compile(DDP(module)), the order PyTorch recommends. The unwrapped networks stay
        reachable through ``modules()`` for evaluation and checkpoints.
        """
        self.forward_fn = wrapper(self.forward_fn)

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Convert every network (and, in ``prepare``, every input batch) to ``memory_format``."""
        self.memory_format = memory_format
        for m in self.modules().values():
            m.to(memory_format=memory_format)

    def autocast(self) -> torch.autocast:
        """The autocast context for forward passes (disabled without ``autocast_dtype``)."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def prepare(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Move a batch to the device, in the networks' memory format.

        A views x B x C x H x W batch (``num_views > 1``) is laid out so that every view
        ``images[k]`` is itself in that format (memory formats are defined for 4-d tensors).
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if images.dim() == 5:
            if self.memory_format is torch.channels_last:
                return images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3), labels
            return images.contiguous(), labels
        return images.contiguous(memory_format=self.memory_format), labels

    def distribute(self, wrap_ddp: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the training forward in ONE data-parallel wrapper (``wrap_ddp(module)``).

        Requires ``forward_fn`` to be a module holding every parameter any optimizer updates:
        that single wrapper then all-reduces every gradient in the one backward of ``step``.
        Call before any other ``wrap_forward`` (DDP goes innermost).
        """
        module = self.forward_fn
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.forward_fn is {type(module).__name__}, not an "
                "nn.Module: data parallelism needs the module that computes the losses"
            )
        held = {id(p) for p in module.parameters()}
        missing = [
            f"{name}[group {g}]"
            for name, opt in self.optimizers().items()
            for g, group in enumerate(opt.param_groups)
            if any(id(p) not in held for p in group["params"])
        ]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.forward_fn does not hold the parameters of "
                f"{', '.join(missing)}; their gradients would not be all-reduced"
            )
        self.wrap_forward(wrap_ddp)

    def convert_sync_batchnorm(self) -> None:
        """Turn every BatchNorm of every network into ``SyncBatchNorm``, in place.

        The parameters and buffers stay the same objects, so optimizers and ``forward_fn`` keep
        pointing at them.
        """
        for name, m in self.modules().items():
            if nn.SyncBatchNorm.convert_sync_batchnorm(m) is not m:
                raise TypeError(f"network {name!r} is itself a BatchNorm layer; wrap it first")

    # -- training -------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, batches_per_epoch: int | None = None) -> None:
        """Prepare epoch ``epoch`` (numbered from 1): modes, weights, learning rates.

        With ``batches_per_epoch`` the learning-rate warm-up advances per iteration; without it
        (calling ``train_step`` directly), per epoch.
        """
        self._epoch = epoch
        self._batches_per_epoch = batches_per_epoch
        self._iter = 0
        self.train()

    def resume_epoch(self, epoch: int, batches_per_epoch: int, done: int) -> None:
        """Prepare epoch ``epoch`` as if its first ``done`` iterations had just run.

        For a run resumed from a mid-epoch checkpoint. Methods whose per-iteration state is more
        than the iteration counter override this.
        """
        self.begin_epoch(epoch, batches_per_epoch)
        self._iter = int(done)

    @abstractmethod
    def step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        """One full training iteration; returns every loss term as a detached 0-d tensor.

        Values stay on the device: reading them forces a host sync, so callers accumulate and
        read once per logging interval.
        """

    def train_step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, float]:
        """``step`` with its results read back as Python floats (one host sync)."""
        if self._epoch != epoch:
            self.begin_epoch(epoch)
        out = self.step(images, labels, epoch)
        values = torch.stack([v.float() for v in out.values()]).tolist()
        return dict(zip(out.keys(), values, strict=True))

    @abstractmethod
    def evaluate(self, loader: Iterable, reduce: Reduce = _identity) -> dict[str, float]:
        """Accuracy (percent) of every network on ``loader``; ``reduce`` sums counts over ranks."""

    # -- state ----------------------------------------------------------------------------
    @abstractmethod
    def modules(self) -> Mapping[str, nn.Module]:
        """Every network by a stable name (used for checkpoints, DDP and device moves)."""

    @abstractmethod
    def optimizers(self) -> Mapping[str, torch.optim.Optimizer]:
        """Every optimizer by a stable name."""

    @abstractmethod
    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of each optimizer parameter group, for logging."""

    @abstractmethod
    def deploy_model(self) -> nn.Module:
        """The network users keep (FFSD: the leader)."""

    @abstractmethod
    def networks(self) -> dict[str, str]:
        """Each evaluable network's name -> the prefix of its keys in ``state_dict()["modules"]``.

        A prefix is ``<module name>.<key prefix inside it>``, e.g. ``nets.leader.``; the network
        ``deploy_name`` must be among them.
        """

    def describe(self) -> str:
        """One line for the run log: the networks and their trainable parameters."""
        unique = {id(p): p.numel() for m in self.modules().values() for p in m.parameters()}
        return f"{', '.join(self.networks())}: {sum(unique.values()):,} trainable parameters"

    def train(self) -> None:
        for m in self.modules().values():
            m.train()

    def eval(self) -> None:
        for m in self.modules().values():
            m.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
            # Read by ffsd.tasks.weights to take one network out of a run state.
            "networks": self.networks(),
            "deploy": self.deploy_name,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mods, opts = self.modules(), self.optimizers()
        if set(state["modules"]) != set(mods) or set(state["optimizers"]) != set(opts):
            raise ValueError(
                f"checkpoint holds networks {sorted(state['modules'])} and optimizers "
                f"{sorted(state['optimizers'])}; this run has {sorted(mods)} and {sorted(opts)}"
            )
        for k, m in mods.items():
            m.load_state_dict(state["modules"][k])
        for k, o in opts.items():
            o.load_state_dict(state["optimizers"][k])
