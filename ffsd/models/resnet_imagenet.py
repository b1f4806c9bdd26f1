"""ImageNet ResNet-18/34 (torchvision layout); taps: outputs of layer1..layer4 (k = 4).

Module names follow the release, which follows torchvision (``conv1``, ``bn1``, ``layer<s>``,
``fc``), so torchvision ResNet weights load too (without the leader head).
"""

from __future__ import annotations

from torch import Tensor, nn

from ffsd.models.base import TapNet
from ffsd.models.pool import global_pool
from ffsd.models.resnet_cifar import BasicBlock


class ImageNetResNet(TapNet):
    input_size = 224

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        leader: bool = False,
        num_students: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        for stage, (planes, blocks) in enumerate(
            zip((64, 128, 256, 512), layers, strict=True), start=1
        ):
            stride = 1 if stage == 1 else 2
            seq = [BasicBlock(in_planes, planes, stride)]
            seq += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*seq))
            in_planes = planes
        self.fc = nn.Linear(512, num_classes)
        self.tap_channels = (64, 128, 256, 512)
        self._finish(leader, num_students)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return f1, f2, f3, f4

    def classify(self, last_tap: Tensor) -> Tensor:
        return self.fc(global_pool(last_tap))


def resnet18(**kwargs) -> ImageNetResNet:
    return ImageNetResNet((2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ImageNetResNet:
    return ImageNetResNet((3, 4, 6, 3), **kwargs)
