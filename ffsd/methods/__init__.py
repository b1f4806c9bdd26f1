"""Online-distillation methods: what one iteration of a method computes and updates.

Owns the interface the engine drives (:mod:`~ffsd.methods.base`: :class:`OnlineMethod`), the
composition of a method from the config (:mod:`~ffsd.methods.build`) and one module per method,
each a ``conf/distill/*.yaml`` option (:mod:`~ffsd.methods.ffsd`).

May import: :mod:`ffsd.models`, :mod:`ffsd.losses`, :mod:`ffsd.schedules`, :mod:`ffsd.config`.
Never the training run, tracking or tasks: a method is a pure function of its batches.
"""

from ffsd.methods.ffsd import FFSD, FFSDNetworks

__all__ = ["FFSD", "FFSDNetworks"]
