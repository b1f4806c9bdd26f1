"""The training run: the engine and what keeps a run going.

Owns the epoch/step loop (:mod:`~ffsd.training.engine`), the process group and data-parallel
wrapping (:mod:`~ffsd.training.distributed`), preemption, stop signals and requeue
(:mod:`~ffsd.training.preemption`), run-state files and resume checks
(:mod:`~ffsd.training.checkpoint`), the lock that keeps a run directory to one live process
(:mod:`~ffsd.training.run_lock`), the
process runtime (device, threads, seeds, RNG state, host allocator:
:mod:`~ffsd.training.runtime`) and speed options (:mod:`~ffsd.training.acceleration`).

May import: :mod:`ffsd.methods`, :mod:`ffsd.models`, :mod:`ffsd.data`, the tracker interface
(:mod:`ffsd.tracking.base`), :mod:`ffsd.config`, :mod:`ffsd.losses`, :mod:`ffsd.schedules`.
Never :mod:`ffsd.tasks` or :mod:`ffsd.report`. The engine knows a method only through
:class:`~ffsd.methods.base.OnlineMethod`.
"""
