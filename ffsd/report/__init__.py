"""Reports of tracked runs: ``python -m ffsd.report <experiment-or-sweep>``.

Owns reading a sweep's runs back from MLflow and summarizing them (:mod:`~ffsd.report.summary`:
tables, statistics) and the figures (:mod:`~ffsd.report.plots`).

May import: :mod:`ffsd.tracking` and :mod:`ffsd.config`. Never torch, the networks or the
training run: a report is read on any machine, from the store alone.
"""
