"""Datasets and loaders: CIFAR-10/100, ImageNet (ImageFolder), digits, synthetic.

Owns the :class:`~ffsd.data.base.DataModule` each ``conf/dataset/*.yaml`` names by
``_target_``, the reader of the CIFAR files that trusts none of them
(:mod:`~ffsd.data.cifar_files`), the on-device tensor pipeline
(:mod:`~ffsd.data.tensor_pipeline`), building the configured one (:mod:`~ffsd.data.build`) and
loader-worker set-up (:mod:`~ffsd.data.workers`).

May import: :mod:`ffsd.config` only.
"""

from ffsd.data.base import DataIntegrityError, DataModule, DataNotFoundError, ShardSampler
from ffsd.data.cifar import CIFARData
from ffsd.data.digits import DigitsData
from ffsd.data.imagenet import ImageFolderData
from ffsd.data.synthetic import SyntheticData

__all__ = [
    "CIFARData",
    "DataIntegrityError",
    "DataModule",
    "DataNotFoundError",
    "DigitsData",
    "ImageFolderData",
    "ShardSampler",
    "SyntheticData",
]
