"""What ``launch.py`` runs: one module per ``task=`` option, and what they share.

Owns the entry points (``conf/task/*.yaml`` name ``ffsd.tasks.<task>.run``):
:mod:`~ffsd.tasks.train`, :mod:`~ffsd.tasks.evaluate`, :mod:`~ffsd.tasks.export`; the reader of
network weights from checkpoint files (:mod:`~ffsd.tasks.weights`) and of the model and dataset
a checkpoint was trained with (:mod:`~ffsd.tasks.checkpoint_config`); validation of the composed
config (:mod:`~ffsd.tasks.validation`) and of the command line's added keys
(:mod:`~ffsd.tasks.overrides`); the Hydra callbacks of the launching process
(:mod:`~ffsd.tasks.hydra_callbacks`); and the removal of a run directory a command stopped
before any work leaves (:mod:`~ffsd.tasks.cleanup`).

The top of the import graph: may import every other package except :mod:`ffsd.report`;
nothing in ffsd imports it (``launch.py`` and ``conf/`` do).
"""
