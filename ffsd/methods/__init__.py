"""Online-distillation methods: what one iteration of a method computes and updates.

Owns the interface the engine drives (:mod:`~ffsd.methods.base`: :class:`OnlineMethod`), the
composition of a method from the config (:mod:`~ffsd.methods.build`), one module per method, each a
``conf/distill/*.yaml`` option (:mod:`~ffsd.methods.ffsd`, :mod:`~ffsd.methods.independent`,
:mod:`~ffsd.methods.dml`, :mod:`~ffsd.methods.kdcl`, :mod:`~ffsd.methods.one`,
:mod:`~ffsd.methods.pcl`, :mod:`~ffsd.methods.cl_ilr`, :mod:`~ffsd.methods.okddip`), what the
K-network methods share (:mod:`~ffsd.methods.peers`) and the accuracy bookkeeping
(:mod:`~ffsd.methods.metrics`).

May import: :mod:`ffsd.models`, :mod:`ffsd.losses`, :mod:`ffsd.schedules`, :mod:`ffsd.config`. Never
the training run, tracking or tasks: a method is a pure function of its batches.
"""

from ffsd.methods.cl_ilr import CLILR
from ffsd.methods.dml import DML
from ffsd.methods.ffsd import FFSD, FFSDNetworks
from ffsd.methods.independent import Independent
from ffsd.methods.kdcl import KDCL
from ffsd.methods.okddip import OKDDip
from ffsd.methods.one import ONE
from ffsd.methods.pcl import PCL

__all__ = ["CLILR", "DML", "FFSD", "KDCL", "ONE", "PCL", "FFSDNetworks", "Independent", "OKDDip"]
