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

The same guard covers the stop signals of ``trainer.stop_signals`` (default TERM and INT):
SIGTERM, what Docker, Kubernetes and systemd send to stop a service, and Ctrl-C's SIGINT save
the same way, then take their usual course (SIGTERM: the process ends by it; SIGINT: Python's
KeyboardInterrupt, which ``launch.py`` turns into exit status 130 without a traceback). In a
submitit job SIGTERM is left to submitit (:func:`stop_signals`).

A SIGKILL cannot be caught; the run then resumes from the last checkpoint written (atomically:
a half-written file is never left in place of a good one).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the run saved where it was: the engine has logged the one line to show."""


def stop_signals(
    preempt: str | int | None,
    extra: Iterable[str | int] = (),
    *,
    submitit: bool | None = None,
) -> tuple[signal.Signals, ...]:
    """The signals a run saves on: the preemption signal and ``extra`` (``trainer.stop_signals``).

    In a submitit job (``SUBMITIT_EXECUTOR`` set) SIGTERM stays submitit's: it logs and ignores
    it while it waits for the preemption signal, and SLURM sends SIGTERM to a requeued job's
    steps, so saving and stopping there would end a job that is meant to carry on.
    """
    if submitit is None:
        submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    out = [s for s in (parse_signal(preempt), *(parse_signal(x) for x in extra)) if s]
    if submitit:
        out = [s for s in out if s is not signal.SIGTERM or s is parse_signal(preempt)]
    return tuple(dict.fromkeys(out))


class PreemptionGuard:
    """Records the first of ``signals`` that arrives while active; :meth:`hand_off` passes it on.

    A second Ctrl-C (SIGINT) while a save is pending does not wait for the step boundary: it goes
    to the previous handler at once (Python's raises KeyboardInterrupt), as a user pressing it
    twice expects.
    """

    def __init__(self, signals: signal.Signals | Iterable[signal.Signals] | None) -> None:
        if signals is None:
            signals = ()
        elif isinstance(signals, signal.Signals):
            signals = (signals,)
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(signals))
        #: The first guarded signal received since the last hand-off, or None.
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def sig(self) -> signal.Signals | None:
        """The signal received, else the first one guarded."""
        return self.received or (self.signals[0] if self.signals else None)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            try:
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:
                    continue  # whoever started us wants this signal ignored
                signal.signal(sig, self._record)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.warning("not the main thread: no mid-epoch checkpoint on %s", sig.name)
                break
            self._previous[sig] = previous
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot put back; the default is
            # the closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
        elif sig is signal.SIGINT:
            self._deliver(sig, saved=False)

    def handler(self, sig: signal.Signals | int) -> Any:
        """The handler ``sig`` had before this guard (None if the guard does not hold it)."""
        return self._previous.get(signal.Signals(sig))

    def takes_default_action(self, sig: signal.Signals | int | None = None) -> bool:
        """Whether handing ``sig`` (default: the one received) on ends the process by itself."""
        sig = signal.Signals(sig) if sig else self.received
        return sig in self._previous and not callable(self._previous[sig])

    def hand_off(self, sig: signal.Signals | int | None = None) -> None:
        """Pass ``sig`` (default: the one received) on as if this guard had never been there.

        May end the process. With several processes the ranks agree on one signal first, so a
        rank that was not signalled hands on the same one as the others.
        """
        sig = signal.Signals(sig) if sig else self.received
        self.received = None
        if sig is None or sig not in self._previous:
            return
        self._deliver(sig, saved=True)

    def _deliver(self, sig: signal.Signals, *, saved: bool) -> None:
        previous = self._previous[sig]
        if callable(previous):
            if previous is not signal.default_int_handler:  # that one is plain Ctrl-C
                name = getattr(previous, "__qualname__", type(previous).__name__)
                log.info(
                    "%s; handing %s on to %s",
                    "checkpoint saved" if saved else "not saved",
                    sig.name,
                    name,
                )
            previous(int(sig), None)
            return
        # SIG_DFL (or None: installed from C): restore it and deliver the signal again.
        log.debug("%s now takes its default action", sig.name)
        signal.signal(sig, signal.SIG_DFL)
        del self._previous[sig]
        signal.raise_signal(sig)
        # Still running: the kernel drops a default-action signal that the init process of a
        # PID namespace sends itself (python as PID 1 of a container). End as the signal would.
        raise SystemExit(128 + int(sig))
