"""Datasets and loaders: CIFAR-10/100, ImageNet (ImageFolder), digits, synthetic.

Each ``conf/dataset/*.yaml`` names a :class:`~ffsd.data.base.DataModule` by ``_target_``.
"""

from ffsd.data.base import DataModule, DataNotFoundError, ShardSampler
from ffsd.data.cifar import CIFARData
from ffsd.data.digits import DigitsData
from ffsd.data.imagenet import ImageFolderData
from ffsd.data.synthetic import SyntheticData

__all__ = [
    "CIFARData",
    "DataModule",
    "DataNotFoundError",
    "DigitsData",
    "ImageFolderData",
    "ShardSampler",
    "SyntheticData",
]
