"""The networks FFSD trains: ten architectures, the fusion module and the decoders, and the
layers they share that PyTorch lacks (``batch_norm``: precise NHWC BatchNorm statistics).

Owns each architecture's constructor (``num_classes``, ``leader``, ``num_students``), which
returns a :class:`~ffsd.models.base.TapNet` whose ``forward`` gives logits, taps and (leader
only) the trans-fusion output; configs name them by ``_target_`` (``conf/model/*.yaml``).

May import: nothing else of ffsd (torch only).
"""

from ffsd.models.base import LogitsOnly, NetOutput, TapNet, count_parameters
from ffsd.models.decoder import Decoder
from ffsd.models.densenet import densenet40
from ffsd.models.fusion import FusionModule, TransFusionModule
from ffsd.models.googlenet import googlenet
from ffsd.models.resnet_cifar import resnet20, resnet32, resnet56
from ffsd.models.resnet_imagenet import resnet18, resnet34
from ffsd.models.wrn import wrn16_2, wrn28_10, wrn40_2

__all__ = [
    "Decoder",
    "FusionModule",
    "LogitsOnly",
    "NetOutput",
    "TapNet",
    "TransFusionModule",
    "count_parameters",
    "densenet40",
    "googlenet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet56",
    "wrn16_2",
    "wrn28_10",
    "wrn40_2",
]
