"""Speed options against the eager fp32 path: same losses and parameters within stated bounds."""

from __future__ import annotations

import copy

import pytest
import torch

import ffsd
from ffsd.config import ConfigError
from ffsd.tasks.validation import validate
from ffsd.training.acceleration import accelerate

from .conftest import make_cfg

STEPS = 3


#: ResNet-8 (one block per stage): the blocks, BatchNorms, fusion and decoders of ResNet-20 in a
#: third of the graph, for the one test that pays torch.compile's tracing and code generation.
RESNET8 = ("model.net._target_=ffsd.models.resnet_cifar.CifarResNet", "+model.net.blocks=1")


def build(*model_overrides: str, **options):
    cfg = make_cfg(
        "dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", *model_overrides
    )
    torch.manual_seed(0)
    method = ffsd.build_method(cfg, 10, "cpu")
    accelerate(method, **options)
    return method


def batches(n=STEPS, size=16):
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 3, 32, 32, generator=g)
    for _ in range(n):
        y = torch.randint(10, (size,), generator=g)
        yield protos[y] + torch.randn(size, 3, 32, 32, generator=g), y


def assert_terms_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for k in a:
        if not k.endswith("/acc"):  # argmax may flip on a near-tie; the losses carry the numerics
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=atol), k


def assert_updates_close(ref, opt, before: dict, rel_update: float) -> None:
    """Every parameter tensor's step agrees with the eager step within ``rel_update`` of its size.

    Measured as ||opt - ref|| / ||ref update|| per tensor: an L2 ratio, because the largest
    single-element gap depends on which entries happen to sit near zero and varies by CPU.
    """
    for (name, p), q in zip(ref.nets.named_parameters(), opt.nets.parameters(), strict=True):
        update = (p - before[name]).norm().item()
        diff = (q - p).norm().item()
        assert diff <= rel_update * update + 1e-7, f"{name}: {diff:.2e} vs update {update:.2e}"


def check_option(
    rel_update: float, free_run: bool = True, model: tuple[str, ...] = (), **options
) -> None:
    """Each of a few steps, from the same state, gives the eager fp32 losses and update.

    Stated tolerances: every loss term within 1e-4 (relative) of eager fp32 at each step; every
    parameter's update within ``rel_update`` of the eager update. Starting each step from the
    eager path's state keeps the comparison about the option's numerics: left to run freely,
    FFSD amplifies any rounding difference 10-30x per step (Adam's first, nearly sign-like
    updates of the decoders; normalized attention maps); a two-step free run is bounded at 1e-3.
    The decoders' first Adam step (a sign of tiny gradients) is compared from step 2 on.
    """
    ref, opt = build(*model), build(*model, **options)
    for k, (x, y) in enumerate(batches()):
        opt.load_state_dict(copy.deepcopy(ref.state_dict()))
        before = {n: p.detach().clone() for n, p in ref.nets.named_parameters()}
        want, got = ref.train_step(x, y, 6), opt.train_step(x, y, 6)
        assert_terms_close(want, got, rtol=1e-4, atol=1e-6)
        if k > 0:
            assert_updates_close(ref, opt, before, rel_update)
    if free_run:
        ref, opt = build(*model), build(*model, **options)
        for x, y in batches(n=2):
            want, got = ref.train_step(x, y, 6), opt.train_step(x, y, 6)
        assert_terms_close(want, got, rtol=1e-3, atol=1e-5)


def test_channels_last_matches_eager_fp32():
    """With ffsd's precise NHWC BatchNorm statistics (the default): updates within 2 % of eager
    NCHW's (measured up to 0.5 % on ResNet-20, batch 16), losses to 1e-4."""
    check_option(0.02, channels_last=True)
    m = build(channels_last=True)
    assert m.leader.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_with_pytorchs_nhwc_batch_norm_matches_less_closely():
    """trainer.nhwc_batch_norm=native: PyTorch's NHWC kernel sums each channel's statistics
    sequentially; updates within 5 % (measured up to 1.4 %, about 3x the precise path's)."""
    check_option(0.05, free_run=False, channels_last=True, nhwc_batch_norm="native")


@pytest.mark.slow
def test_compile_matches_eager_fp32():
    """Updates within 5 % (measured up to 1.2 %: inductor decomposes BatchNorm into its own
    reductions); losses to 1e-4. One compiled model only, ResNet-8 students: compiling costs
    minutes on 2 CPU cores."""
    check_option(
        5e-2,
        free_run=False,
        model=RESNET8,
        compile={"enabled": True, "backend": "inductor", "dynamic": False},
    )


@pytest.fixture(scope="module")
def eager():
    m = build()
    return m, [m.train_step(x, y, 6) for x, y in batches()]


def test_bf16_autocast_runs_and_stays_close(eager):
    """bf16 keeps 8 bits of mantissa: losses agree to ~2 %. (The CUDA path is the same code.)"""
    _, ref_losses = eager
    m = build(precision="bf16")
    losses = [m.train_step(x, y, 6) for x, y in batches()]
    for la, lb in zip(ref_losses, losses, strict=True):
        for k in ("leader/ce", "student0/ce", "fusion/ce", "student1/kd"):
            assert lb[k] == pytest.approx(la[k], rel=5e-2, abs=1e-3), k
    # The networks still hold fp32 parameters: autocast only changes the compute dtype.
    assert all(p.dtype == torch.float32 for p in m.nets.parameters())


def test_evaluate_follows_the_options(eager):
    ref, _ = eager
    m = build(channels_last=True)
    m.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(10, (8,), generator=g))]
    a, b = ref.evaluate(loader), m.evaluate(loader)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), k


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "trainer.precision=fp16",
            "trainer.precision='fp16' is not valid; choose one of: fp32, bf16",
        ),
        (
            "trainer.channels_last=maybe",
            "trainer.channels_last='maybe' is not valid; choose one of: true, false, auto",
        ),
        ("trainer.compile.enabled=1", "trainer.compile.enabled=1 must be true or false"),
    ],
)
def test_options_are_validated(override, fragment):
    cfg = make_cfg(override, "trainer.output_dir=/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert fragment in str(err.value)


def test_channels_last_auto_is_on_for_cpu_off_for_cuda_and_logged_as_such():
    """The config default, auto: NHWC with precise BatchNorm statistics on CPU, where it was
    measured as close to float64 as NCHW and faster; NCHW on CUDA until measured there."""
    from ffsd.training.acceleration import resolve_channels_last, set_numerics

    assert make_cfg("trainer.output_dir=/unused").trainer.channels_last == "auto"
    assert resolve_channels_last("auto", torch.device("cpu")) is True
    assert resolve_channels_last("auto", torch.device("cuda", 0)) is False
    assert resolve_channels_last(False, torch.device("cpu")) is False
    m = build()
    applied = set_numerics(m, channels_last="auto")
    assert applied[0] == "channels_last (auto on cpu)"
    assert applied[1].startswith("precise NHWC BatchNorm statistics")
    assert m.leader.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="choose one of: true, false, auto"):
        resolve_channels_last("yes", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_says_whether_the_cpu_computes_it_natively(monkeypatch, caplog, native):
    """Without AVX512-BF16 or AMX, oneDNN emulates bf16 (10x slower than fp32 on an AVX2 EPYC):
    the run warns and names the fix; on a bf16 CPU it only notes it."""
    import ffsd.training.acceleration as acc

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    assert acc.cpu_has_native_bf16() is native
    with caplog.at_level("INFO", logger="ffsd"):
        m = build()
        applied = acc.set_numerics(m, precision="bf16")
    assert applied == ["autocast bf16"] and m.autocast_dtype is torch.bfloat16
    (record,) = [r for r in caplog.records if "trainer.precision=bf16" in r.getMessage()]
    if native:
        assert record.levelname == "INFO" and "natively" in record.getMessage()
    else:
        assert record.levelname == "WARNING"
        assert (
            "emulates bf16" in record.getMessage()
            and "trainer.precision=fp32" in record.getMessage()
        )
