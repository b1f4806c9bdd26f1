"""The training run: epochs, evaluation, checkpoints, resume, progress and the final summary.

The engine drives any :class:`~ffsd.methods.base.OnlineMethod` through ``begin_epoch``, ``step``,
``evaluate`` and its state; it knows nothing of FFSD's networks. Per-step loss terms stay on the
device and are summed there; the host reads them once per ``trainer.log_every`` iterations (the
progress bar) and once per epoch.

Files in the run directory (``trainer.output_dir``):

* ``checkpoints/last.pt``: the full run state after the latest epoch (``ffsd.training.checkpoint``),
  or, after a preemption signal, in the middle of an epoch (below).
* ``checkpoints/model_<deploy>_best.pth``: the method's best deploy network so far
  (``OnlineMethod.deploy_name``; FFSD: ``model_leader_best.pth``), in the release's format.
* ``metrics.jsonl``: one JSON object per epoch (train means, test metrics, learning rates, time).
* ``summary.json``: best and final accuracies, written at the end.
* ``.run.lock``: locked by the main process for the whole run (``ffsd.training.run_lock``), so a
  second live job given the same directory is refused; at the start, holding it, the temporary
  files of writes that a kill interrupted are removed.

Every file is replaced atomically (``ffsd.training.checkpoint``: temporary file, fsync, rename).

Several processes (``ffsd.training.distributed``): each rank trains on its shard of every epoch, and
per-step terms and evaluation counts are summed over ranks before they are read, so logged
metrics cover the whole data. Only rank 0 prints, logs, talks to the tracker and writes files;
collectives (buffer broadcast, RNG gathering for checkpoints) run on every rank.

Mid-epoch checkpoints (``ffsd.training.preemption``): on the preemption signal the run saves, at the
next step boundary, ``last.pt`` with ``epoch`` = the last *completed* epoch plus ``partial``: the
epoch in progress, how many of its batches are done, each rank's partial loss sums and RNG state.
Resuming skips those batches of the epoch's (seed, epoch)-determined sample order and restores the
sums and RNG states. With ``num_workers=0`` the augmentations draw from the process's global RNG, so
the rest of the epoch replays exactly (``tests/test_resume.py``). With worker processes, the sample
order is still exact but the workers' random streams restart at the resume point, so the rest of
that one epoch sees different augmentations; resumes at an epoch end are exact either way (workers
are seeded from (seed, epoch, rank)).

Divergence: the terms read every ``log_every`` steps are checked for NaN and infinities there (a
non-finite step makes its running sums non-finite, so nothing is missed between reads), and so
are the test metrics and, before it is saved as the best, the deploy network's weights; the run
then stops with :class:`TrainingDiverged`. With several processes the ranks decide together, in
the all-reduce that also carries the stop signals. A resume compares the stored config with this
one (``ffsd.training.checkpoint.config_changes``) and refuses changes that alter the run unless
``trainer.resume_changes=allow``."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ffsd.data.base import DataModule
from ffsd.methods.base import OnlineMethod
from ffsd.tracking.base import NullTracker, Tracker
from ffsd.training import checkpoint as ckpt
from ffsd.training.distributed import SINGLE, DistContext
from ffsd.training.preemption import Interrupted, PreemptionGuard, stop_signals
from ffsd.training.run_lock import RunDirBusy, RunDirLock, hold_run_dir
from ffsd.training.runtime import rng_state, set_rng_state

log = logging.getLogger("ffsd")

#: The run's config beside its checkpoints (read by task=eval and task=export).
RUN_CONFIG = "config.yaml"


class TrainingDiverged(RuntimeError):
    """A loss term or a test metric became NaN or infinite; the message says where and why."""


def first_nonfinite(values: dict[str, float]) -> str | None:
    """The first key whose value is NaN or infinite, in the dict's order."""
    return next((k for k, v in values.items() if not math.isfinite(v)), None)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: JSON has no token for them (``NaN`` is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


class DeviceMeans:
    """Batch-size-weighted running means of 0-d device tensors, read with one sync.

    The terms of a step are stacked into one vector and added with one op, so accumulating
    costs two kernels per step whatever the number of terms (they would be ~90 launches on a
    GPU). ``read`` returns the means since the last ``read`` (``since_last=True``, the progress
    bar) or since the start (the epoch).
    """

    def __init__(self) -> None:
        self.keys: list[str] | None = None
        self.total: torch.Tensor | None = None
        self.count = 0
        self._mark: torch.Tensor | None = None
        self._mark_count = 0

    def add(self, terms: dict[str, torch.Tensor], n: int) -> None:
        if self.keys is None:
            self.keys = list(terms)
        values = torch.stack([terms[k].detach().float() for k in self.keys])
        self.total = values * n if self.total is None else self.total.add_(values, alpha=n)
        self.count += n

    def state(self) -> dict[str, Any]:
        """The running sums (on the CPU) and count, for mid-epoch checkpoints."""
        total = None if self.total is None else self.total.cpu()
        return {"keys": self.keys, "total": total, "count": self.count}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.keys = None if state["keys"] is None else list(state["keys"])
        total = state["total"]
        self.total = None if total is None else total.to(device)
        self.count = int(state["count"])
        self._mark, self._mark_count = None, 0

    def read(
        self, keys: list[str] | None = None, reduce=None, since_last: bool = False
    ) -> dict[str, float]:
        if self.keys is None or self.total is None:
            return {}
        names = [k for k in (keys or self.keys) if k in self.keys]
        rows = torch.tensor([self.keys.index(k) for k in names], device=self.total.device)
        total, count = self.total.index_select(0, rows), self.count
        if since_last:
            if self._mark is not None:
                total = total - self._mark.index_select(0, rows)
                count -= self._mark_count
            self._mark, self._mark_count = self.total.clone(), self.count
        packed = torch.cat([total, total.new_tensor([float(count)])])
        if reduce is not None:
            packed = reduce(packed)
        values = packed.tolist()
        denom = values[-1] or 1.0
        return {k: v / denom for k, v in zip(names, values[:-1], strict=True)}


class Trainer:
    """Runs ``method`` on ``data`` for ``cfg.trainer.epochs`` epochs in ``run_dir``."""

    def __init__(
        self,
        cfg: DictConfig,
        method: OnlineMethod,
        data: DataModule,
        *,
        run_dir: str | Path,
        tracker: Tracker | None = None,
        dist: DistContext = SINGLE,
    ) -> None:
        self.cfg = cfg
        self.t = cfg.trainer
        self.method = method
        self.data = data
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tracker = tracker or NullTracker()
        self.dist = dist
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"metric": method.primary_metric, "value": None, "epoch": None}
        self.start_epoch = 1
        #: Position inside ``start_epoch`` to continue from (a mid-epoch checkpoint), or None.
        self.resume_position: dict[str, Any] | None = None
        #: Config changes that resumes of this run were allowed to make (``resume_changes``).
        self.resume_changes: list[dict[str, Any]] = []
        self.guard = PreemptionGuard(
            stop_signals(self.t.preempt_signal, OmegaConf.select(self.t, "stop_signals") or ())
        )
        self._finished = False

    # -- identity of a run, to refuse resuming from another one -----------------------------
    def fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "method": str(OmegaConf.select(c, "distill._target_")),
            "model": str(OmegaConf.select(c, "model.name")),
            "dataset": str(OmegaConf.select(c, "dataset.name")),
            "num_classes": int(self.data.num_classes),
            "num_students": OmegaConf.select(c, "distill.num_students"),
            "batch_size": int(c.trainer.batch_size),
            "seed": int(c.trainer.seed),
            "world_size": int(self.dist.world_size),
        }

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    # -- resume ------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        mode = str(self.t.resume)
        if mode == "never":
            if self.last_path.exists():
                raise ckpt.CheckpointError(
                    f"{self.last_path} exists and trainer.resume=never: refusing to overwrite a "
                    "run. Use trainer.resume=auto to continue it, or another trainer.output_dir."
                )
            return
        if mode == "auto":
            if not self.last_path.exists():
                return
            path = self.last_path
        else:
            path = Path(mode)
        state = ckpt.load_state(path, self.fingerprint())
        self._check_changes(path, state)
        self._check_position(path, state.get("partial"))
        configured = [
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in self.method.optimizers().values()
        ]
        try:
            self.method.load_state_dict(state["method"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"{path} does not fit this run: {err}") from err
        # Optimizer state_dicts carry their hyperparameters (lr, initial_lr, momentum, ...): keep
        # the momentum buffers but this config's values, or an allowed optim.* change would be
        # silently undone. Unchanged settings give the same values, so exact resumes stay exact.
        for opt, groups in zip(self.method.optimizers().values(), configured, strict=True):
            for group, values in zip(opt.param_groups, groups, strict=True):
                group.update(values)
        # Each rank continues its own random stream (the fingerprint pins the world size).
        set_rng_state(state.get("rng_ranks", [state["rng"]])[self.dist.rank])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = int(state["epoch"]) + 1
        self.resumed_run_id = state.get("tracking_run_id")
        partial = state.get("partial")
        if partial is not None:
            self.start_epoch = int(partial["epoch"])
            self.resume_position = dict(partial, means=partial["ranks"][self.dist.rank])
        if self.dist.is_main:
            if partial is None:
                log.info("resumed from %s after epoch %d", path, state["epoch"])
            else:
                log.info(
                    "resumed from %s inside epoch %d, after batch %d of %d",
                    path,
                    partial["epoch"],
                    partial["batches_done"],
                    partial["batches"],
                )

    def _check_changes(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a resume whose config changes what the run computes, or log and record it.

        ``trainer.resume_changes=allow`` lets it go ahead; the changes are then logged and kept
        in the run state's ``resume_changes``. ``trainer.epochs`` alone is the run's length:
        changing it is allowed (and logged) as long as the run has not gone past the new end;
        a schedule that depends on it (cosine's ``schedule.epochs``) shows as its own change.
        """
        changes = ckpt.config_changes(state.get("config"), self.cfg)
        partial = state.get("partial")
        at = int(partial["epoch"]) if partial is not None else int(state["epoch"])
        length = changes.pop("trainer.epochs", None)
        if length is not None and int(self.t.epochs) < at:
            changes["trainer.epochs"] = length  # the run is already past the new end
        self.resume_changes = list(state.get("resume_changes") or [])
        where = (
            f"inside epoch {partial['epoch']}"
            if partial is not None
            else f"after epoch {state['epoch']}"
        )
        if length is not None and "trainer.epochs" not in changes and self.dist.is_main:
            length_note = f"trainer.epochs {length[0]} -> {length[1]}: the run now ends there"
        else:
            length_note = None
        if not changes:
            if length_note:
                log.info(length_note)
            return
        lines = "\n".join(
            f"  {k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in changes.items()
        )
        if str(OmegaConf.select(self.t, "resume_changes", default="refuse")) != "allow":
            raise ckpt.CheckpointError(
                f"{path} ({where}) was written with other values of settings that change what "
                f"the run computes:\n{lines}\nResume with the checkpoint's values, or start a "
                "new run in another trainer.output_dir. To continue this run with the new values "
                "anyway, add trainer.resume_changes=allow (the changes are then logged and "
                "recorded in the run state)."
            )
        if self.dist.is_main:
            log.warning(
                "resuming %s %s with changed settings (trainer.resume_changes=allow):\n%s",
                path,
                where,
                lines,
            )
            if length_note:
                log.info(length_note)
        self.resume_changes.append(
            {
                "epoch": int(state["epoch"]),
                "inside_epoch": None if partial is None else int(partial["epoch"]),
                "changes": changes,
            }
        )

    def _check_position(self, path: Path, partial: dict[str, Any] | None) -> None:
        """A mid-epoch checkpoint's batch position must still fit that epoch's data."""
        if partial is None:
            return
        epoch, done = int(partial["epoch"]), int(partial["batches_done"])
        batches = len(
            self.data.train_loader(
                int(self.t.batch_size),
                seed=int(self.t.seed),
                epoch=epoch,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                device=self.method.device,
                views=self.method.num_views,
            )
        )
        if batches != int(partial["batches"]):
            raise ckpt.CheckpointError(
                f"{path} was saved inside epoch {epoch} after batch {done} of "
                f"{partial['batches']}, but epoch {epoch} of this run has {batches} batches "
                f"({self.data.describe()}): the position no longer fits the data. Resume with "
                "the data settings the checkpoint was written with to finish that epoch (a "
                "change at an epoch end can then be allowed with trainer.resume_changes=allow), "
                "or start a new run in another trainer.output_dir."
            )

    def save_state(self, epoch: int, partial: dict[str, Any] | None = None) -> None:
        """Write ``last.pt`` after completed epoch ``epoch`` (collective: call on every rank).

        ``partial``: the position inside epoch ``epoch + 1`` and this rank's ``means`` state.
        """
        mine: dict[str, Any] = {"rng": rng_state()}
        if partial is not None:
            mine["means"] = partial["means"]
        ranks = self.dist.gather_objects(mine)
        if not self.dist.is_main:
            return
        state = {
            "format": ckpt.STATE_FORMAT,
            "version": ckpt.STATE_VERSION,
            "epoch": epoch,
            "method": self.method.state_dict(),
            "rng": ranks[0]["rng"],
            "best": self.best,
            "history": self.history,
            "tracking_run_id": self.tracker.run_id,
            "fingerprint": self.fingerprint(),
            "config": OmegaConf.to_yaml(self.cfg, resolve=False),
            "resume_changes": self.resume_changes,
            "partial": None,
        }
        if self.dist.world_size > 1:
            state["rng_ranks"] = [r["rng"] for r in ranks]
        if partial is not None:
            state["partial"] = {k: v for k, v in partial.items() if k != "means"} | {
                "ranks": [r["means"] for r in ranks]
            }
        ckpt.atomic_save(state, self.last_path)

    # -- preemption --------------------------------------------------------------------------
    def agree(self, collective: bool = True, diverged: bool = False) -> tuple[int, bool]:
        """(the stop signal a rank received, 0 for none; whether a rank's losses diverged).

        Single process: flags read as they are. With several processes the ranks must agree
        (one all-reduce for both), so this is only asked where ``collective`` is true, on every
        rank at the same iteration; elsewhere the answer is (0, False).
        """
        mine = [float(int(self.guard.received or 0)), float(diverged)]
        if self.dist.enabled:
            if not collective:
                return 0, False
            mine = self.dist.max_values(mine)
        return int(mine[0]), mine[1] > 0

    def stop_requested(self, collective: bool = True) -> bool:
        """Has any rank been sent a stop signal (preemption, SIGTERM, SIGINT)?"""
        return self.agree(collective)[0] != 0

    def _hand_off(self, sig: int, where: str) -> None:
        """After the checkpoint ``where`` (a phrase), pass the stop signal on.

        Where that ends the process at once (the default action), the tracked run is closed
        first (KILLED): no ``finally`` runs after it. Ctrl-C's KeyboardInterrupt comes back as
        :class:`Interrupted`, which ``launch.py`` ends quietly since this line said it all.
        """
        previous = self.guard.handler(sig)
        default = self.guard.takes_default_action(sig)
        stops = default or previous is signal.default_int_handler
        if self.dist.is_main:
            log.warning(
                "%s: saved %s %s%s",
                signal.Signals(sig).name,
                self.last_path,
                where,
                "; stopping (the same command continues the run)" if stops else "",
            )
            if default:
                self._finish("KILLED")
        try:
            self.guard.hand_off(sig)
        except KeyboardInterrupt as err:
            raise Interrupted(f"saved {self.last_path} {where}") from err

    def _finish(self, status: str) -> None:
        if not self._finished:
            self._finished = True
            self.tracker.finish(status)

    def _diverged(
        self, epoch: int, first: int, last: int, n_batches: int, term: str | None
    ) -> NoReturn:
        """Stop every rank with the epoch, the steps, the first non-finite term and the rates."""
        terms = self.dist.gather_objects(term)  # every rank is here: they agreed to stop
        rank, term = next((r, t) for r, t in enumerate(terms) if t is not None)
        steps = f"step {last}" if last - first <= 1 else f"steps {first + 1}-{last}"
        on_rank = f" on rank {rank}" if self.dist.world_size > 1 else ""
        raise TrainingDiverged(
            f"training diverged in epoch {epoch}, {steps} of {n_batches}{on_rank}: the loss term "
            f"{term!r} is not finite (the first such term; terms are read every "
            f"trainer.log_every={self.t.log_every} steps). {self._advice()}"
        )

    def _advice(self) -> str:
        rates = ", ".join(f"{k}={v:.4g}" for k, v in self.method.learning_rates().items())
        kept = (
            f"{self.last_path} is from before it (resume from it with lower rates and "
            "trainer.resume_changes=allow, or start over)"
            if self.last_path.exists()
            else "no checkpoint was written"
        )
        return (
            f"Learning rates: {rates}. Lower the learning rates (optim.*.lr) or the loss "
            f"weights; {kept}."
        )

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        pos = self.resume_position if self.resume_position is not None else {}
        self.resume_position = None
        done = int(pos.get("batches_done", 0))
        loader = self.data.train_loader(
            int(self.t.batch_size),
            seed=int(self.t.seed),
            epoch=epoch,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.method.device,
            skip_batches=done,
            views=self.method.num_views,
        )
        n_batches = done + len(loader)
        means = DeviceMeans()
        if pos:
            self.method.resume_epoch(epoch, n_batches, done)
            means.load(pos["means"], self.method.device)
        else:
            self.method.begin_epoch(epoch, n_batches)
        shown = list(self.method.progress_terms)
        bar = tqdm(
            loader,
            total=n_batches,
            initial=done,
            desc=f"epoch {epoch}/{self.t.epochs}",
            disable=not (self.t.progress and self.dist.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter() - float(pos.get("seconds", 0.0))
        seen = int(pos.get("seen", 0))
        last_read = done
        for i, (images, labels) in enumerate(bar, start=done):
            terms = self.method.step(images, labels, epoch)
            n = int(labels.shape[0])
            means.add(terms, n)
            seen += n
            at_log = (i + 1) % int(self.t.log_every) == 0 or i + 1 == n_batches
            bad = None
            if at_log:
                # Every term, not only the bar's: still one read, and a term that is not shown
                # may be the first to diverge. A NaN or inf step poisons the sums it joins.
                vals = means.read(since_last=True)
                bad = first_nonfinite(vals)
                rate = seen / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(
                    progress_postfix(vals, shown, rate * self.dist.world_size), refresh=False
                )
            sig, diverged = self.agree(collective=at_log, diverged=bad is not None)
            if diverged:
                bar.close()
                self._diverged(epoch, last_read, i + 1, n_batches, bad)
            if at_log:
                last_read = i + 1
            if sig and i + 1 < n_batches:
                self.save_state(
                    epoch - 1,
                    partial={
                        "epoch": epoch,
                        "batches_done": i + 1,
                        "batches": n_batches,
                        "seen": seen,
                        "seconds": time.perf_counter() - start,
                        "means": means.state(),
                    },
                )
                self.dist.barrier()
                self._hand_off(sig, f"inside epoch {epoch} after batch {i + 1} of {n_batches}")
        out = means.read(reduce=self.dist.all_reduce_sum)
        bar.close()
        # Ranks' BatchNorm statistics drift apart by their last batch: evaluate and checkpoint
        # rank 0's everywhere (DDP would broadcast them before the next forward anyway).
        for module in self.method.modules().values():
            self.dist.broadcast_buffers(module)
        seconds = time.perf_counter() - start
        train = {f"train/{k}": v for k, v in out.items()}
        train["time/train_s"] = seconds
        train["throughput/train_img_s"] = seen * self.dist.world_size / max(seconds, 1e-9)
        return train

    def evaluate(self) -> dict[str, float]:
        loader = self.data.test_loader(
            int(self.t.test_batch_size),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            device=self.method.device,
        )
        start = time.perf_counter()
        out = self.method.evaluate(loader, reduce=self.dist.all_reduce_sum)
        res = {f"test/{k}": v for k, v in out.items()}
        res["time/eval_s"] = time.perf_counter() - start
        return res

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """The whole run, from the start or from ``last.pt``, holding the run directory."""
        lock = self._hold_run_dir()
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _hold_run_dir(self) -> RunDirLock | None:
        """Rank 0 locks the run directory before reading anything in it; every rank stops if
        another live job holds it. Holding it, no one else writes there: the temporary files a
        killed write left can go."""
        lock, busy = None, None
        if self.dist.is_main:
            try:
                lock = hold_run_dir(self.run_dir)
            except RunDirBusy as err:
                busy = str(err)
        busy = self.dist.broadcast_object(busy)
        if busy is not None:
            raise RunDirBusy(busy)
        if lock is not None:
            for path in ckpt.remove_stale_temporaries(self.run_dir, self.ckpt_dir):
                log.info("removed %s, left by a write that was killed", path)
        return lock

    def _fit(self) -> dict[str, Any]:
        self.resumed_run_id: str | None = None
        self.maybe_resume()
        epochs = int(self.t.epochs)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tracker.start(self.cfg, self.run_dir, resume_run_id=self.resumed_run_id)
            # Beside last.pt and the best network: task=eval and task=export read the model and
            # dataset from it, so the file alone is enough to evaluate (resolve=False, as last.pt).
            ckpt.atomic_write_text(
                OmegaConf.to_yaml(self.cfg, resolve=False), self.ckpt_dir / RUN_CONFIG
            )
        status = "FAILED"
        try:
            with self.guard:
                for epoch in range(self.start_epoch, epochs + 1):
                    self.run_epoch(
                        epoch, evaluate=(epoch % int(self.t.eval_every) == 0) or epoch == epochs
                    )
                    # The epoch's checkpoint is written: nothing more to save before handing
                    # the signal on. After the last epoch the run just finishes.
                    sig = self.agree()[0] if epoch < epochs else 0
                    if sig:
                        self._hand_off(sig, f"after epoch {epoch}")
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            if self.dist.is_main and status != "FINISHED":
                self._finish(status)
        summary = self.summary()
        if self.dist.is_main:
            ckpt.atomic_write_text(_dumps(summary, indent=2), self.run_dir / "summary.json")
            print(format_summary(summary))
            print(self.where_saved(summary))
            self.tracker.log_summary(summary_metrics(summary))
            self._finish("FINISHED")
        return summary

    def where_saved(self, summary: dict[str, Any]) -> str:
        """The run's last lines: where the best network and ``last.pt`` are, and the command that
        evaluates the best (its model and dataset travel with it: no other argument needed)."""
        name, best = self.method.deploy_name, summary["best"]
        best_path = (self.ckpt_dir / f"model_{name}_best.pth").resolve()
        lines = []
        if best_path.is_file():
            lines.append(
                f"best {name}: {best_path} (epoch {best['epoch']}, test/{best['metric']} "
                f"{_pct(best['value'])} %)"
            )
        lines.append(f"run state (every network; resumes the run): {self.last_path.resolve()}")
        target = best_path if best_path.is_file() else self.last_path.resolve()
        lines.append(
            f"evaluate: python {shlex.quote(launcher())} task=eval "
            f"checkpoint={shlex.quote(str(target))}"
        )
        return "\n".join(lines)

    def run_epoch(self, epoch: int, evaluate: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch}
        record |= self.train_epoch(epoch)
        record |= self.method.learning_rates()
        if evaluate:
            record |= self.evaluate()
            bad = first_nonfinite({k: v for k, v in record.items() if k.startswith("test/")})
            if bad is not None:  # the same on every rank: evaluation counts are all-reduced
                raise TrainingDiverged(
                    f"training diverged: after epoch {epoch} the test metric {bad!r} is not "
                    f"finite, so some network computes NaN or infinite outputs. "
                    f"{self._advice()}"
                )
            value = record.get(f"test/{self.best['metric']}")
            if (
                value is not None
                and math.isfinite(value)
                and (self.best["value"] is None or value > self.best["value"])
            ):
                # Accuracy stays finite whatever the weights; a NaN network must still never be
                # saved as the best one. One check per new best, on every rank (same weights).
                if not finite_weights(self.method.deploy_model()):
                    raise TrainingDiverged(
                        f"training diverged: after epoch {epoch} the {self.method.deploy_name} "
                        f"network has NaN or infinite weights. {self._advice()}"
                    )
                self.best.update(value=value, epoch=epoch)
                if self.dist.is_main:
                    name = self.method.deploy_name
                    ckpt.save_release(
                        self.method.deploy_model(),
                        self.ckpt_dir / f"model_{name}_best.pth",
                        epoch=epoch,
                        cfg=str(OmegaConf.select(self.cfg, "model.name")),
                        index=name,
                    )
        record["time/epoch_s"] = time.perf_counter() - start
        self.history.append(record)
        # Record the epoch before its checkpoint: a job killed in between re-runs the epoch and
        # logs it again (readers take the latest value of a step); the other order would resume
        # past an epoch whose metrics no one had written.
        if self.dist.is_main:
            self._write_history()
            metrics = {k: float(v) for k, v in record.items() if k != "epoch"}
            self.tracker.log_metrics(metrics, step=epoch)
            log.info(epoch_line(record, self.method, int(self.t.epochs)))
        self.save_state(epoch)
        self.dist.barrier()
        return record

    def _write_history(self) -> None:
        # Strict JSON (NaN/inf as null): readers such as jq or JSON.parse reject a bare NaN.
        lines = "".join(_dumps(r) + "\n" for r in self.history)
        ckpt.atomic_write_text(lines, self.run_dir / "metrics.jsonl")

    def summary(self) -> dict[str, Any]:
        """Best (with its epoch) and final test value of every ``test/*/top*`` metric."""
        evaluated = [r for r in self.history if any(k.startswith("test/") for k in r)]
        out: dict[str, Any] = {
            "primary_metric": self.best["metric"],
            "best": self.best,
            "epochs": len(self.history),
            "metrics": {},
        }
        if not evaluated:
            return out
        keys = [k for k in evaluated[-1] if k.startswith("test/") and "/top" in k]
        for k in keys:
            vals = [(r[k], r["epoch"]) for r in evaluated if k in r]
            finite = [p for p in vals if p[0] is not None and math.isfinite(p[0])]
            best_v, best_e = max(finite, key=lambda p: (p[0], -p[1])) if finite else (None, None)
            out["metrics"][k[len("test/") :]] = {
                "best": best_v,
                "best_epoch": best_e,
                "final": vals[-1][0],
            }
        return out


def finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is finite (one host sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat final metrics: ``best/<metric>``, ``best_epoch/<metric>``, ``final/<metric>``."""
    out: dict[str, float] = {}
    for name, m in summary["metrics"].items():
        for key in ("best", "best_epoch", "final"):
            if m[key] is not None:
                out[f"{key}/{name}"] = m[key]
    return out


#: Metrics in percent: training-batch accuracies (``train/leader/acc``) and test top-k.
PERCENT = re.compile(r"(^|/)(acc|top\d+)$")


def with_unit(key: str, value: float, digits: int = 4) -> str:
    """``value`` of metric ``key`` with its unit after it: ``95.31 %`` for an accuracy."""
    return f"{value:.{digits}g} %" if PERCENT.search(key) else f"{value:.{digits}g}"


def progress_postfix(values: dict[str, float], shown: list[str], img_s: float) -> str:
    """The progress bar's text: the shown terms under their metric names (``train/leader/acc``:
    the accuracy on the augmented training batches since the last refresh), then images/s."""
    parts = [f"train/{k} {with_unit(k, values[k], 3)}" for k in shown if k in values]
    return ", ".join([*parts, f"{img_s:.0f} img/s"])


def epoch_line(record: dict[str, Any], method: OnlineMethod, epochs: int) -> str:
    """One log line per epoch: the method's first progress term (on the training batches), its
    primary and epoch metrics (on the test split), each under its metric name, units after the
    numbers: ``epoch 3/8 | train/leader/loss 0.41 | test/leader/top1 95.3 % | ... | 812 img/s``.
    """
    parts = [f"epoch {record['epoch']}/{epochs}"]
    keys = [f"train/{t}" for t in method.progress_terms[:1]]
    keys += [f"test/{m}" for m in (method.primary_metric, *method.epoch_metrics)]
    parts += [f"{key} {with_unit(key, record[key])}" for key in keys if key in record]
    units = (("throughput/train_img_s", "img/s", ".0f"), ("time/epoch_s", "s", ".3g"))
    parts += [f"{record[k]:{fmt}} {unit}" for k, unit, fmt in units if k in record]
    return " | ".join(parts)


def launcher() -> str:
    """The entry point as this process was started (``launch.py``, a path to it), for the
    command lines it prints."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return str(started) if started is not None and started.name == "launch.py" else "launch.py"


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of best (epoch) and final test accuracy per network."""
    rows = summary["metrics"]
    if not rows:
        return "no evaluation was run"
    head = ("metric", "best", "epoch", "final")
    lines = [
        [name, _pct(m["best"]), str(m["best_epoch"]), _pct(m["final"])] for name, m in rows.items()
    ]
    widths = [max(len(r[i]) for r in [list(head), *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    sep = "  ".join("-" * w for w in widths)
    best = summary["best"]
    title = (
        f"Test accuracy (%) over {summary['epochs']} epochs; best {best['metric']} = "
        f"{_pct(best['value'])} at epoch {best['epoch']}"
    )
    return "\n".join([title, fmt.format(*head), sep, *(fmt.format(*r) for r in lines)])


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"
