"""The process group a run belongs to: how it starts, what it knows, how it ends.

A single process is the world of size 1, and every collective here is then a no-op, so the engine
has one code path for one process and for many.

:func:`session` starts the group from whatever launched the process:

* **torchrun** (``python -m torch.distributed.run --nproc_per_node=N launch.py ...``): rank and
  world size come from its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` variables.
* **SLURM through submitit** (``hydra/launcher=slurm``, one task per GPU): submitit's
  ``TorchDistributedEnvironment`` turns the SLURM task variables into the same ``env://``
  variables (master = first node of the job, port derived from the job id, so a requeued job
  finds it again). It is told not to touch ``CUDA_VISIBLE_DEVICES``: SLURM may already have
  narrowed it to the job's GPUs, and the device is picked by local rank below.
* anything else: one process, no process group.

Backend ``auto`` is NCCL when the run is on CUDA and gloo on CPU. Each process uses the GPU of
its local rank, and, unless ``trainer.threads`` says otherwise, ``cores / local world size`` CPU
threads so that the processes of one node do not oversubscribe it. The group is destroyed when
the session ends, also on errors.

Data parallelism itself (:func:`data_parallel`) wraps the method's training forward in ONE
``DistributedDataParallel``; see that function for why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from ffsd.methods.base import OnlineMethod

log = logging.getLogger("ffsd")

BACKEND_CHOICES = ("auto", "nccl", "gloo")


class DistributedSetupError(RuntimeError):
    """The process group cannot be formed as configured (raised before any training)."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    #: The device this process computes on (``cuda:<local_rank>`` for multi-GPU runs).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: ``torchrun``, ``submitit`` or ``single``: what started the process.
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo moves CPU ones.
        if self.enabled and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over all ranks (a new tensor; ``t`` itself is left alone)."""
        if not self.enabled:
            return t
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max_values(self, values: list[float]) -> list[float]:
        """Each value's maximum over all ranks, on every rank (one all-reduce for the list)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every rank's ``module``."""
        if not self.enabled:
            return
        for b in module.buffers():
            if b.device.type == "cuda" or dist.get_backend() != "nccl":
                dist.broadcast(b, src=0)
            else:  # a CPU buffer under NCCL: go through the device
                tmp = b.to(self.device)
                dist.broadcast(tmp, src=0)
                b.copy_(tmp)


SINGLE = DistContext()


# -- start and end ------------------------------------------------------------------------------
def _launch_env() -> tuple[dict[str, int], str]:
    """Rank variables from torchrun or a multi-task submitit job; world of 1 otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        return {
            "rank": int(os.environ["RANK"]),
            "world_size": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        }, "torchrun"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            env = submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False
            )
            return {
                "rank": env.rank,
                "world_size": env.world_size,
                "local_rank": env.local_rank,
                "local_world_size": env.local_world_size,
            }, "submitit"
    return {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}, "single"


def _pick_device(device: torch.device, local_rank: int, world_size: int) -> torch.device:
    if device.type != "cuda" or world_size == 1:
        return device
    if device.index is not None:
        raise DistributedSetupError(
            f"trainer.device={device} names one GPU, but this is a {world_size}-process run: "
            "use trainer.device=cuda (or auto); each process takes the GPU of its local rank"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedSetupError(
            f"local rank {local_rank} has no GPU: this node shows {count} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); start at most "
            f"{count} processes per node (torchrun --nproc_per_node, "
            "hydra.launcher.tasks_per_node)"
        )
    return torch.device("cuda", local_rank)


def resolve_backend(choice: str, device: torch.device) -> str:
    """``auto`` -> nccl on CUDA, gloo on CPU; refuses NCCL for CPU tensors."""
    if choice not in BACKEND_CHOICES:
        raise DistributedSetupError(
            f"trainer.distributed.backend={choice!r} is not valid; choose one of: "
            f"{', '.join(BACKEND_CHOICES)}"
        )
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise DistributedSetupError(
            f"trainer.distributed.backend=nccl needs CUDA, but the run is on {device}; "
            "use backend=gloo (or auto) for CPU runs"
        )
    return choice


def default_threads(local_world_size: int) -> int:
    """CPU threads per process: the cores this process may use, shared by the node's ranks."""
    from ffsd.training.runtime import cpu_count

    return max(1, cpu_count() // max(1, local_world_size))


@contextmanager
def session(backend: str = "auto", device: torch.device | str = "cpu") -> Iterator[DistContext]:
    """Join the process group of this launch (if any) for the duration of the ``with`` block.

    ``device`` is the resolved ``trainer.device``; for multi-process CUDA runs each process gets
    ``cuda:<local rank>`` instead.
    """
    env, launcher = _launch_env()
    device = _pick_device(torch.device(device), env["local_rank"], env["world_size"])
    ctx = DistContext(**env, device=device, launcher=launcher)
    if ctx.world_size == 1:
        yield ctx
        return
    name = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=name,
            init_method="env://",
            rank=ctx.rank,
            world_size=ctx.world_size,
            device_id=device if device.type == "cuda" else None,
        )
        owned = True
    else:  # someone (a caller embedding ffsd) already formed the group
        owned = False
    try:
        if ctx.is_main:
            log.info(
                "distributed: %d processes (%s, %s backend), %d per node",
                ctx.world_size,
                launcher,
                name,
                ctx.local_world_size,
            )
        yield ctx
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# -- one run directory --------------------------------------------------------------------------
def shared_run_dir(ctx: DistContext, own: Path, hydra_dir: Path | None = None) -> Path:
    """Rank 0's run directory, on every rank.

    Under torchrun each rank runs Hydra and may time-stamp its own directory a second apart;
    rank 0's is authoritative. A non-main rank whose Hydra directory differs removes what Hydra
    put there (``.hydra/`` and an empty log) if that is all there is, so no stray run folder is
    left behind; anything else is left alone.
    """
    chosen = Path(ctx.broadcast_object(str(own)))
    if not ctx.is_main and hydra_dir is not None and hydra_dir.resolve() != chosen.resolve():
        _remove_hydra_only_dir(hydra_dir)
    return chosen


def _remove_hydra_only_dir(folder: Path) -> None:
    if not folder.is_dir():
        return
    hydra_files = {"config.yaml", "hydra.yaml", "overrides.yaml"}
    meta = folder / ".hydra"
    entries = list(folder.iterdir())
    for e in entries:
        if e == meta and e.is_dir() and {p.name for p in e.iterdir()} <= hydra_files:
            continue
        if e.suffix == ".log" and e.is_file() and e.stat().st_size == 0:
            continue
        return  # something we did not expect: keep the folder
    for e in entries:
        if e.is_dir():
            for p in e.iterdir():
                p.unlink()
            e.rmdir()
        else:
            e.unlink()
    folder.rmdir()


# -- randomness per rank ------------------------------------------------------------------------
def seed_rank_streams(seed: int, rank: int) -> None:
    """Give ranks > 0 their own random streams (augmentations differ between shards).

    Called after the networks are built: every rank built them from ``seed`` (and DDP broadcasts
    rank 0's anyway), and rank 0 keeps the stream a single process would have.
    """
    if rank == 0:
        return
    from ffsd.training.runtime import seed_everything

    seed_everything(int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0]))


# -- data parallelism ---------------------------------------------------------------------------
def data_parallel(method: OnlineMethod, ctx: DistContext, *, sync_bn: bool = False) -> None:
    """Make ``method`` train data-parallel over ``ctx``'s process group.

    Design: the method's training forward (``forward_fn``: for FFSD the one ``FFSDNetworks``
    container whose forward computes every loss of the iteration) is wrapped in ONE
    ``DistributedDataParallel``. The single backward over the total loss then fires one gradient
    all-reduce covering every network and decoder, and the optimizers step on identical averaged
    gradients on every rank. This sidesteps the multi-model pitfalls: no DDP wrapper per network
    (whose hooks would fire once per network backward, and whose forward-order assumptions break
    when one network's output feeds another), no per-optimizer synchronisation, and the detached
    cross-network signals (u, g, logits for KD) are ordinary tensors inside one forward. The
    decoders used "in eval mode" inside that forward go through ``Decoder(..., frozen=True)``, a
    functional eval-mode BatchNorm under ``no_grad``: no mode toggling that DDP could see.

    * ``find_unused_parameters=False``: every parameter receives a gradient every step (the
      decoders from their train-mode pass; tests/test_distributed.py checks it), so DDP need not
      walk the graph. ``OnlineMethod.distribute`` checks up front that the wrapped module holds
      every parameter an optimizer updates, so none can silently miss the all-reduce.
    * Buffers synced before each forward (DDP's default; ``broadcast_buffers``, called
      ``forward_sync_buffers`` from torch 2.14): rank 0's BatchNorm running statistics are
      copied to all ranks, so the frozen decoder path (which reads running statistics) and every
      eval-mode use compute the same function on every rank. The engine also broadcasts buffers
      after each epoch, so evaluation and checkpoints see rank 0's statistics everywhere.
    * ``sync_bn``: BatchNorm layers become ``SyncBatchNorm`` (batch statistics over the global
      batch) before wrapping; parameters and buffers are the same objects, so optimizers and
      checkpoints are unaffected. The frozen decoder path keeps using running statistics
      (eval-mode BN never synchronises). SyncBatchNorm runs on CUDA only.

    The unwrapped networks stay in ``method.modules()`` for evaluation and checkpoints.
    """
    if ctx.world_size == 1:
        if sync_bn:
            log.info("trainer.sync_bn=true has nothing to synchronise in a 1-process run")
        return
    if sync_bn:
        if ctx.device.type != "cuda":
            raise DistributedSetupError(
                f"trainer.sync_bn=true needs CUDA: SyncBatchNorm does not run on {ctx.device}. "
                "Use trainer.sync_bn=false for CPU runs"
            )
        method.convert_sync_batchnorm()
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    method.distribute(
        lambda module: DDP(
            module,
            device_ids=ids,
            output_device=ids[0] if ids else None,
            find_unused_parameters=False,
        )
    )
