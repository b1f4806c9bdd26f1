"""Reading one network from any checkpoint kind: inference, head removal and the promised errors."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

import ffsd.models as M
from ffsd.config import ConfigError
from ffsd.tasks.weights import (
    build_network,
    has_head,
    identify_architecture,
    read_network_checkpoint,
)
from ffsd.training.checkpoint import CheckpointError

from .checkpoints import randomize_bn, write_release


def build(ckpt, arch="resnet20", num_classes=10, dataset="cifar10"):
    return build_network(
        ckpt,
        getattr(M, arch),
        model_name=arch,
        num_classes=num_classes,
        dataset_name=dataset,
    )


def test_release_leader_infers_leader_students_classes_epoch(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, num_students=3, num_classes=10, epoch=7)
    ckpt = read_network_checkpoint(path)
    assert (ckpt.kind, ckpt.network, ckpt.leader) == ("release", "leader", True)
    assert (ckpt.num_students, ckpt.num_classes, ckpt.epoch) == (3, 10, 7)
    assert ckpt.recorded_model == "resnet20"
    text = ckpt.describe()
    assert "3 students" in text and "64 -> 192" in text and str(path) in text


def test_release_student_file_is_a_student(tmp_path):
    path = tmp_path / "model1_best.pth"
    write_release(path, leader=False, index="1")
    ckpt = read_network_checkpoint(path)
    assert (ckpt.network, ckpt.leader, ckpt.num_students) == ("student1", False, None)
    assert "unknown" in ckpt.describe()


def test_leader_loads_without_its_head_and_gives_the_same_logits(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    original = write_release(path, num_students=3)
    net = build(read_network_checkpoint(path))
    assert not net.leader and not has_head(net)
    student = M.resnet20(num_classes=10)
    assert M.count_parameters(net) == M.count_parameters(student)
    assert M.count_parameters(original) > M.count_parameters(net)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, original(x).logits, rtol=0, atol=0)


def test_bare_and_wrapped_state_dicts_load(tmp_path):
    net = randomize_bn(M.resnet20(num_classes=10, leader=True, num_students=2))
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    for name in ("bare.pt", "wrapped.pt"):
        ckpt = read_network_checkpoint(tmp_path / name)
        assert ckpt.kind == "state_dict" and ckpt.leader and ckpt.num_students == 2
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(build(ckpt)(x).logits, net(x).logits, rtol=0, atol=0)
    assert "module." in read_network_checkpoint(tmp_path / "wrapped.pt").describe()


def test_network_choice_is_checked_against_a_one_network_file(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path)
    assert read_network_checkpoint(path, "leader").network == "leader"
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(path, "student0")
    assert str(path) in str(err.value) and "task.network=student0" in str(err.value)
    with pytest.raises(
        ConfigError,
        match=r"task\.network='boss'.*auto, all .*leader, student<i>.*net<k>.*ema_peer<k>",
    ):
        read_network_checkpoint(path, "boss")


def test_fusion_module_file_is_refused(tmp_path):
    path = tmp_path / "modelfusion_best.pth"
    fusion = M.FusionModule(64, 2, 10)
    torch.save(
        {"weight": fusion.state_dict(), "epoch": 3, "cfg": "resnet20", "index": "fusion"}, path
    )
    with pytest.raises(CheckpointError, match="fusion module"):
        read_network_checkpoint(path)


# -- files that are not checkpoints --------------------------------------------------------


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(path)
    assert str(path) in str(err.value) and "not a PyTorch checkpoint" in str(err.value)
    assert "weights_only=False" not in str(err.value)  # torch's own advice is never passed on


def test_truncated_file(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_text_file_and_plain_pickle_and_dict_without_weights(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("best epoch 7, top-1 72.6\n")
    with pytest.raises(CheckpointError, match=f"{text}.*not a PyTorch checkpoint"):
        read_network_checkpoint(text)
    pickled = tmp_path / "stats.pkl"
    pickled.write_bytes(pickle.dumps({"acc": 72.6, "epoch": 7}))
    with pytest.raises(CheckpointError, match=f"{pickled}.*pickle"):
        read_network_checkpoint(pickled)
    no_weights = tmp_path / "meta.pth"
    torch.save({"acc": 72.6, "epoch": 7}, no_weights)
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(no_weights)
    assert str(no_weights) in str(err.value) and "not network weights" in str(err.value)
    assert "['acc', 'epoch']" in str(err.value)


def test_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(M.resnet20(num_classes=10), path)
    with pytest.raises(CheckpointError) as err:
        read_network_checkpoint(path)
    assert str(path) in str(err.value) and "weights_only=True" in str(err.value)
    assert "ffsd.models.resnet_cifar.CifarResNet" in str(err.value)


# -- weights of another architecture or class count ----------------------------------------


def test_other_architecture_names_keys_and_guesses_it(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, "resnet56", num_classes=10)
    ckpt = read_network_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        build(ckpt, "resnet20")
    msg = str(err.value)
    assert str(path) in msg and "does not fit model=resnet20" in msg
    # resnet56 has 9 blocks per stage, resnet20 3: the first key resnet20 lacks is layer1.3.*
    assert "unexpected keys (" in msg and "layer1.3.conv1.weight" in msg
    assert "this looks like a resnet56 checkpoint: try model=resnet56" in msg


def test_other_family_lists_first_missing_unexpected_and_shape_mismatches(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, "wrn16_2", num_classes=10)
    with pytest.raises(CheckpointError) as err:
        build(read_network_checkpoint(path), "resnet20")
    msg = str(err.value)
    assert msg.startswith(f"{path} does not fit model=resnet20")
    # WRN-16-2 has 2 blocks per stage (resnet20: 3), biased convolutions and 128-wide BN.
    assert "missing keys (50, first 5): layer1.2.conv1.weight;" in msg
    assert "unexpected keys (21, first 5): conv1.bias;" in msg
    assert "shape mismatches (62, first 5): bn1.weight: file (128,) vs model (16,);" in msg
    assert "this looks like a wrn16_2 checkpoint: try model=wrn16_2" in msg


def test_other_class_count_names_the_classifier_shapes_and_datasets(tmp_path):
    path = tmp_path / "modelleader_best.pth"
    write_release(path, num_classes=10)
    with pytest.raises(CheckpointError) as err:
        build(read_network_checkpoint(path), "resnet20", num_classes=100, dataset="cifar100")
    msg = str(err.value)
    assert str(path) in msg
    assert "fc.weight: file (10, 64) vs model (100, 64)" in msg
    assert "fc.bias: file (10,) vs model (100,)" in msg
    assert "classifier has 10 classes but dataset=cifar100 has 100" in msg
    assert "cifar10, digits, synthetic" in msg


def test_identify_architecture_on_meta_device(tmp_path):
    for arch in ("resnet20", "wrn40_2", "densenet40"):
        path = tmp_path / f"{arch}.pth"
        write_release(path, arch, num_classes=7, num_students=3)
        assert identify_architecture(read_network_checkpoint(path)) == arch
