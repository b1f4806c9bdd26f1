"""PreciseBatchNorm2d (ffsd/models/batch_norm.py): nn.BatchNorm2d's results, NHWC statistics as
precise as NCHW's, and PyTorch's own path wherever it is not needed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffsd.models.batch_norm import PreciseBatchNorm2d

from .conftest import make_cfg


def pair(channels: int = 4, momentum: float | None = 0.1, dtype=torch.float64):
    """A plain BatchNorm2d with non-trivial affine parameters and its converted copy."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    precise = copy.deepcopy(ref)
    assert PreciseBatchNorm2d.convert(precise) == 1
    return ref, precise


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64_nhwc_steps_equal_nn_batchnorm2d_nchw(momentum):
    """Output, every gradient, the running statistics and the batch counter over three training
    steps agree with nn.BatchNorm2d on the same NCHW input to float64 rounding (momentum None:
    the cumulative average)."""
    ref, precise = pair(momentum=momentum)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 2 + 3
        gy = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
        xr, xp = x.clone().requires_grad_(), nhwc(x).requires_grad_()
        yr, yp = ref(xr), precise(xp)
        assert yp.is_contiguous(memory_format=torch.channels_last)
        yr.backward(gy)
        yp.backward(nhwc(gy))
        torch.testing.assert_close(yp, yr, rtol=0, atol=1e-13)
        torch.testing.assert_close(xp.grad, xr.grad, rtol=0, atol=1e-13)
        torch.testing.assert_close(precise.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(precise.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(precise.running_mean, ref.running_mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(precise.running_var, ref.running_var, rtol=0, atol=1e-14)
    assert precise.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3


def test_hand_computed_statistics():
    """Two channels, two images of 1 x 2 pixels: the batch statistics by hand."""
    _, precise = pair(channels=2)
    with torch.no_grad():
        precise.weight.fill_(1.0)
        precise.bias.zero_()
    # channel 0 takes 1, 2, 3, 4 (mean 2.5, biased variance 1.25, unbiased 5/3); channel 1 is 7
    x = torch.tensor([[[[1.0, 2.0]], [[7.0, 7.0]]], [[[3.0, 4.0]], [[7.0, 7.0]]]]).double()
    y = precise(nhwc(x))
    eps = precise.eps
    want0 = (torch.tensor([[1.0, 2.0], [3.0, 4.0]]).double() - 2.5) / (1.25 + eps) ** 0.5
    torch.testing.assert_close(y[:, 0, 0, :], want0)
    torch.testing.assert_close(y[:, 1], torch.zeros(2, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(precise.running_mean, torch.tensor([0.25, 0.7]).double())
    torch.testing.assert_close(precise.running_var, torch.tensor([0.9 + 0.1 * 5 / 3, 0.9]).double())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_float32_nhwc_output_is_as_close_to_float64_as_nchw():
    """At a CIFAR ResNet's first-stage shape (batch 128, 16 channels, 32 x 32: 131,072 rows per
    channel, values with a mean larger than their spread), the precise NHWC output lands within
    2x of the NCHW kernel's distance to float64 (both measured near 5e-8); PyTorch's own NHWC
    kernel is shown beside it, at about 1e-5 on the CPUs measured."""
    torch.manual_seed(0)
    x = torch.randn(128, 16, 32, 32) * 2 + 3
    ref64 = F.batch_norm(x.double(), None, None, training=True)
    nchw = F.batch_norm(x, None, None, training=True)
    bn = PreciseBatchNorm2d(16, affine=False, track_running_stats=False)
    precise = bn(nhwc(x))
    native = F.batch_norm(nhwc(x), None, None, training=True)
    err_nchw, err_precise = relative_error(nchw, ref64), relative_error(precise, ref64)
    print(
        f"NCHW {err_nchw:.1e}, precise NHWC {err_precise:.1e}, native NHWC "
        f"{relative_error(native, ref64):.1e}"
    )
    assert err_precise <= 2 * err_nchw + 1e-8


def test_backward_through_precise_statistics_matches_float64():
    """The gradients flow through the statistics (PyTorch's training-mode backward, given the
    precise mean and inverse deviation): float32 within 1e-5 of float64 at a mid-size shape."""
    torch.manual_seed(0)
    x = torch.randn(32, 8, 16, 16) * 2 + 3
    gy = torch.randn_like(x)
    ref, precise = pair(channels=8, dtype=torch.float64)
    precise.float()
    x64 = x.double().requires_grad_()
    ref(x64).backward(gy.double())
    x32 = nhwc(x).requires_grad_()
    precise(x32).backward(nhwc(gy))
    assert relative_error(x32.grad, x64.grad) < 1e-5
    assert relative_error(precise.weight.grad, ref.weight.grad) < 1e-5
    assert relative_error(precise.bias.grad, ref.bias.grad) < 1e-5


def test_affine_free_layers_and_no_input_gradient():
    """Without weight and bias, and for an input that needs no gradient, the same results."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, affine=False).double()
    precise = copy.deepcopy(plain)
    PreciseBatchNorm2d.convert(precise)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(precise(nhwc(x)), plain(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "case",
    ["nchw input", "eval mode", "bf16 input", "1x1 maps"],
)
def test_other_inputs_take_nn_batchnorm2d_own_path(case):
    """NCHW input, eval mode, a low-precision input and a 1 x 1 map (NCHW and NHWC at once) give
    bit for bit what nn.BatchNorm2d gives."""
    ref, precise = pair(dtype=torch.float32)
    x = torch.randn(4, 4, 3, 3)
    if case == "eval mode":
        ref.eval()
        precise.eval()
        x = nhwc(x)
    elif case == "bf16 input":
        ref.bfloat16()
        precise.bfloat16()
        x = nhwc(x).bfloat16()
    elif case == "1x1 maps":
        x = torch.randn(4, 4, 1, 1)
    assert PreciseBatchNorm2d.takes_precise_path(x, precise.training) is False
    assert torch.equal(precise(x), ref(x))
    assert torch.equal(precise.running_var, ref.running_var)


def test_convert_keeps_parameters_buffers_and_state_dict():
    """In place: the same parameter and buffer objects (an optimizer built before still steps
    them), the same state dict keys, loadable into a plain network; subclasses such as
    SyncBatchNorm and BatchNorm1d are left alone."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4)
    )
    params = [id(p) for p in net.parameters()]
    buffers = [id(b) for b in net.buffers()]
    keys = list(net.state_dict())
    assert PreciseBatchNorm2d.convert(net) == 1
    assert type(net[1]) is PreciseBatchNorm2d
    assert type(net[2]) is nn.SyncBatchNorm and type(net[3]) is nn.BatchNorm1d
    assert [id(p) for p in net.parameters()] == params
    assert [id(b) for b in net.buffers()] == buffers
    assert list(net.state_dict()) == keys
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4)
    )
    plain.load_state_dict(net.state_dict())
    assert PreciseBatchNorm2d.convert(net) == 0  # already converted


@pytest.mark.parametrize("choice", ["precise", "native"])
def test_channels_last_on_cpu_converts_every_batchnorm_unless_native(choice):
    import ffsd
    from ffsd.training.acceleration import set_numerics

    cfg = make_cfg("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused")
    method = ffsd.build_method(cfg, 10, "cpu")
    layers = [m for net in method.modules().values() for m in net.modules()]
    plain = sum(type(m) is nn.BatchNorm2d for m in layers)
    applied = set_numerics(method, channels_last=True, nhwc_batch_norm=choice)
    converted = sum(type(m) is PreciseBatchNorm2d for m in layers)
    if choice == "precise":
        assert converted == plain > 0
        assert applied == ["channels_last", f"precise NHWC BatchNorm statistics ({plain} layers)"]
    else:
        assert converted == 0 and applied == ["channels_last"]
    # NCHW runs never convert: their kernel is already precise.
    method = ffsd.build_method(cfg, 10, "cpu")
    assert set_numerics(method, channels_last=False) == []
    assert not any(
        type(m) is PreciseBatchNorm2d for net in method.modules().values() for m in net.modules()
    )


def test_a_bad_choice_names_the_key_and_the_choices():
    from ffsd.config import ConfigError
    from ffsd.tasks.validation import validate

    cfg = make_cfg("trainer.nhwc_batch_norm=fast", "trainer.output_dir=/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "trainer.nhwc_batch_norm='fast' is not valid; choose one of: precise, native" in str(
        err.value
    )
