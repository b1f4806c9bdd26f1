"""DataLoader worker set-up: leave job-control signals to the training process.

The training process handles preemption (:mod:`ffsd.training.preemption`); its loader workers
must neither act on those signals nor die of them.
"""

from __future__ import annotations

import os
import signal


def quiet_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave the job-control signals to the main process.

    SLURM signals every process of the job step, DataLoader workers included. The preemption
    signal is the main process's to act on (a spawned worker would die of it), and in a submitit
    job the main process logs and ignores SIGTERM while waiting for that signal, but PyTorch's
    workers die of a SIGTERM not sent by their parent, which crashes the run before it can save.
    A worker whose main process dies still exits (PyTorch's worker watchdog).
    """
    preempt = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    names = {"SIG" + preempt.upper().removeprefix("SIG")}
    if os.environ.get("SUBMITIT_EXECUTOR"):
        names.add("SIGTERM")
    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
