"""Architectures: tap shapes and parameter counts from the spec, release parameter names."""

from __future__ import annotations

import pytest
import torch

import ffsd.models as M
from ffsd.models.decoder import Decoder
from ffsd.models.fusion import FusionModule

# Spec, "Tap features": last tap per architecture (CIFAR 32x32 or ImageNet 224x224 input).
CIFAR_TAPS = {
    "resnet20": [(16, 32), (32, 16), (64, 8)],
    "resnet32": [(16, 32), (32, 16), (64, 8)],
    "resnet56": [(16, 32), (32, 16), (64, 8)],
    "wrn16_2": [(32, 32), (64, 16), (128, 8)],
    "wrn40_2": [(32, 32), (64, 16), (128, 8)],
    "densenet40": [(168, 32), (312, 16), (456, 8)],
    "googlenet": [(480, 32), (832, 16), (1024, 8)],
}
IMAGENET_TAPS = [(64, 56), (128, 28), (256, 14), (512, 7)]


def _forward(net, size, batch=2):
    net.eval()
    with torch.no_grad():
        return net(torch.randn(batch, 3, size, size))


@pytest.mark.parametrize("name", sorted(CIFAR_TAPS))
def test_cifar_taps_logits_and_leader_head(name):
    net = getattr(M, name)(num_classes=100, leader=True, num_students=3)
    out = _forward(net, 32)
    assert [(t.shape[1], t.shape[2]) for t in out.taps] == CIFAR_TAPS[name]
    assert out.logits.shape == (2, 100)
    c, s = CIFAR_TAPS[name][-1]
    assert out.trans.shape == (2, 3 * c, s, s)  # t_L predicts u, N students' last taps
    assert net.tap_channels == tuple(c for c, _ in CIFAR_TAPS[name])
    assert net.input_size == 32


def test_wrn28_10_taps():
    net = M.wrn28_10(num_classes=10)
    assert net.tap_channels == (160, 320, 640)
    assert isinstance(net.layer1[0].dropout, torch.nn.Dropout) and net.layer1[0].dropout.p == 0.3


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_imagenet_taps(name):
    net = getattr(M, name)(num_classes=1000, leader=True)
    out = _forward(net, 224, batch=1)
    assert [(t.shape[1], t.shape[2]) for t in out.taps] == IMAGENET_TAPS
    assert out.trans.shape == (1, 1024, 7, 7)
    assert net.input_size == 224


def test_student_has_no_trans_output():
    out = _forward(M.resnet20(num_classes=10), 32)
    assert out.trans is None


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("resnet20", 0.28),
        ("resnet32", 0.47),
        ("resnet56", 0.86),
        ("wrn16_2", 0.70),
        ("wrn40_2", 2.26),
        ("densenet40", 1.10),
        ("resnet18", 11.69),
        ("resnet34", 21.80),
    ],
)
def test_parameter_counts_as_in_the_paper_code(name, millions):
    classes = 1000 if name.startswith("resnet1") or name == "resnet34" else 100
    net = getattr(M, name)(num_classes=classes)
    assert round(M.count_parameters(net) / 1e6, 2) == millions


def test_leader_parameter_names_are_the_releases():
    # Spec, "Checkpoints of the release": a leader ResNet-32 holds conv1, bn1, layer1.0.conv1, ...,
    # fc, trans_fusion_module.{conv1,bn1,conv1_1,bn1_1}.
    sd = M.resnet32(num_classes=100, leader=True, num_students=2).state_dict()
    for key, shape in {
        "conv1.weight": (16, 3, 3, 3),
        "bn1.running_mean": (16,),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer2.0.downsample.1.weight": (32,),
        "layer3.4.bn2.num_batches_tracked": (),
        "fc.weight": (100, 64),
        "trans_fusion_module.conv1.weight": (64, 1, 3, 3),
        "trans_fusion_module.bn1.weight": (64,),
        "trans_fusion_module.conv1_1.weight": (128, 64, 1, 1),
        "trans_fusion_module.bn1_1.running_var": (128,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("layer4") for k in sd)


def test_wrn_names_and_final_bn_momentum_quirk():
    net = M.wrn40_2(num_classes=100)
    sd = net.state_dict()
    assert "linear.weight" in sd and "bn1.weight" in sd and "conv1.bias" in sd
    assert "layer1.0.shortcut.0.weight" in sd and "layer1.0.conv2.bias" in sd
    assert net.bn1.momentum == 0.9  # spec, Quirks 6
    assert M.wrn40_2(num_classes=100, final_bn_momentum=0.1).bn1.momentum == 0.1


def test_densenet_and_googlenet_names():
    d = M.densenet40(num_classes=100).state_dict()
    assert {
        "conv1.weight",
        "dense1.0.bn1.weight",
        "trans1.conv1.weight",
        "bn.weight",
        "fc.weight",
    } <= set(d)
    g = M.googlenet(num_classes=100).state_dict()
    for k in (
        "pre_layers.0.weight",
        "inception_a3.branch1x1.0.weight",
        "inception_b5.branch5x5.6.weight",
        "inception_e4.branch_pool.1.bias",
        "linear.weight",
    ):
        assert k in g, k


def test_fusion_module_names_shapes_and_g():
    f = FusionModule(64, num_students=3, num_classes=10)
    assert set(f.state_dict()) >= {
        "conv1.weight",
        "bn1.weight",
        "conv1_1.weight",
        "bn1_1.weight",
        "fc2.weight",
    }
    assert f.conv1.groups == 192 and f.conv1_1.weight.shape == (64, 192, 1, 1)
    f.eval()
    logits, g = f(torch.randn(2, 192, 8, 8))
    assert logits.shape == (2, 10) and g.shape == (2, 64, 8, 8)
    assert (g >= 0).all()  # g is the output of the last ReLU


def test_decoder_names_shapes_and_frozen_mode():
    d = Decoder((64, 32, 16))
    names = set(d.state_dict())
    assert {
        "layer0.convtranpose.weight",
        "layer0.norm.running_mean",
        "layer1.convtranpose.weight",
    } <= names
    outs = d(torch.randn(2, 64, 8, 8))
    # Reversed: index 0 lines up with tap 1 (16 x 32 x 32).
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 32), (32, 16, 16)]
    # frozen=True uses running statistics and leaves them alone, even in train mode.
    d.train()
    before = d.layer0.norm.running_mean.clone()
    frozen = d(torch.randn(2, 64, 8, 8), frozen=True)
    assert torch.equal(d.layer0.norm.running_mean, before)
    x = torch.randn(2, 64, 8, 8)
    d.eval()
    ref = d(x)
    d.train()
    got = d(x, frozen=True)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    assert len(frozen) == 2


def test_release_init_statistics():
    torch.manual_seed(0)
    net = M.resnet56(num_classes=100)
    w = net.layer3[0].conv1.weight  # 64 out channels, 3x3: std sqrt(2 / (9 * 64))
    assert w.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.05)
    assert torch.all(net.bn1.weight == 1) and torch.all(net.bn1.bias == 0)


def test_logits_only_wrapper_matches_forward():
    net = M.resnet20(num_classes=10, leader=True)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(M.LogitsOnly(net)(x), net(x).logits)
