"""Preemption and time limits: save at the next step boundary, then let the launcher act.

SLURM warns a job before its time limit with the signal submitit asks for (``sbatch
--signal=USR2@<signal_delay_s>``; ``scancel --signal=USR2`` or ``PreemptParameters=
send_user_signal`` for preemption). submitit 1.5 installs, in every task, a handler for that
signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2) that on global rank 0 calls the submitted
callable's ``checkpoint()`` (hydra-submitit-launcher's returns the same job call, so the requeued
job lands in the same run directory), runs ``scontrol requeue`` and exits; other ranks only log.

Run by itself, that handler would requeue the job but lose everything since the last epoch end,
and it would fire at an arbitrary point of the training step. :class:`PreemptionGuard` puts
itself in front of it while the engine trains:

1. the signal only sets a flag (nothing else runs inside a signal handler, so a checkpoint being
   written is never interrupted by this code);
2. at the next step boundary (with several processes: at the next ``trainer.log_every``
   boundary, where the ranks agree through one all-reduce whether any of them was signalled)
   the engine writes a mid-epoch checkpoint;
3. then the guard calls the handler that was installed before it, with the signal: submitit's
   requeue on rank 0, or, if there was none, the default action (the process ends by the
   signal). If that handler returns, training simply continues.

A SIGKILL cannot be caught; the run then resumes from the last checkpoint written (atomically:
a half-written file is never left in place of a good one).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger("ffsd")


def parse_signal(name: str | int | None) -> signal.Signals | None:
    """``USR2``/``SIGUSR2``/``12`` -> ``signal.SIGUSR2``; None or empty -> None."""
    if name is None or name == "":
        return None
    text = str(name).strip().upper()
    try:
        if text.isdigit():
            sig = signal.Signals(int(text))
        else:
            sig = signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"{name!r} is not a signal on this system") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{sig.name} cannot be caught, so no checkpoint can be saved on it")
    return sig


class PreemptionGuard:
    """Records ``sig`` while active; :meth:`hand_off` passes it to the previous handler."""

    def __init__(self, sig: signal.Signals | None) -> None:
        self.sig = sig
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> PreemptionGuard:
        if self.sig is None:
            return self
        try:
            previous = signal.getsignal(self.sig)
        except ValueError:  # not the main thread: signals cannot be handled here
            log.warning("not the main thread: no mid-epoch checkpoint on %s", self.sig.name)
            return self
        if previous is signal.SIG_IGN:
            return self  # whoever started us wants this signal ignored
        self._previous = previous
        signal.signal(self.sig, self._record)
        self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(self.sig, self._previous)
            self._installed = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def hand_off(self) -> None:
        """Pass the signal on as if this guard had never been there (may end the process)."""
        sig = self.sig
        previous = self._previous
        self.requested = False
        if not self._installed or sig is None:
            return
        if callable(previous):
            name = getattr(previous, "__qualname__", type(previous).__name__)
            log.info("checkpoint saved; handing %s on to %s", sig.name, name)
            previous(int(sig), None)
            return
        # SIG_DFL (or None: installed from C): restore it and deliver the signal again.
        log.info("checkpoint saved; %s now takes its default action", sig.name)
        signal.signal(sig, signal.SIG_DFL)
        self._installed = False
        signal.raise_signal(sig)
