"""Build the configured :class:`~ffsd.data.base.DataModule` from ``cfg.dataset``."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from ffsd.data.base import DataModule


def build_data(cfg: DictConfig) -> DataModule:
    """Instantiate ``cfg.dataset`` and check the files are there (fast, before any work)."""
    data: DataModule = instantiate(cfg.dataset, _convert_="all")
    data.check()
    return data
