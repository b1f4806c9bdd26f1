"""DataLoader worker set-up: leave job-control signals to the training process.

The training process handles preemption (:mod:`ffsd.training.preemption`); its loader workers
must neither act on those signals nor die of them.
"""

from __future__ import annotations

import os
import signal


def quiet_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave the job-control signals to the main process.

    SLURM signals every process of the job step, DataLoader workers included; so do Ctrl-C
    (SIGINT, to the terminal's whole process group) and systemd's stop (SIGTERM, to the whole
    control group). The main process acts on them: it saves and stops (SIGINT, SIGTERM outside
    submitit, the preemption signal) or, in a submitit job, logs and ignores SIGTERM. A worker
    would instead die of the signal (or end its loop on KeyboardInterrupt), and the main
    process's next batch would then fail before it can save. A worker whose main process dies
    still exits (PyTorch's worker watchdog).
    """
    preempt = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    names = {"SIG" + preempt.upper().removeprefix("SIG"), "SIGINT", "SIGTERM"}
    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
