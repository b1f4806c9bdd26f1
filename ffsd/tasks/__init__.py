"""What ``launch.py`` runs: one module per ``task=`` option, and what they share.

Owns the entry points (``conf/task/*.yaml`` name ``ffsd.tasks.<task>.run``):
:mod:`~ffsd.tasks.train`, :mod:`~ffsd.tasks.evaluate`, :mod:`~ffsd.tasks.export`; the reader of
network weights from checkpoint files (:mod:`~ffsd.tasks.weights`); validation of the composed
config (:mod:`~ffsd.tasks.validation`); and the Hydra callbacks of the launching process
(:mod:`~ffsd.tasks.hydra_callbacks`).

The top of the import graph: may import every other package except :mod:`ffsd.report`;
nothing in ffsd imports it (``launch.py`` and ``conf/`` do).
"""
