"""ONE (baselines spec section 3): the gate and teacher by hand, the step against the reference's
iteration, the ramp-up, the switches, the reduction to individual branches, the deploy network."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd.config import ConfigError
from ffsd.methods.one import Gate
from ffsd.models import resnet20
from ffsd.tasks.validation import validate

from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", "distill=one")


def build(*overrides):
    torch.manual_seed(0)
    m = ffsd.build_method(make_cfg(*BASE, *overrides), 10, "cpu")
    m.nets.double()
    return m


def batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(4, 3, 16, 16, generator=g).double(), torch.randint(10, (4,), generator=g))
        for _ in range(n)
    ]


def test_gate_by_hand():
    gate = Gate(2, 3).double().train()
    with torch.no_grad():
        gate.control_v1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        gate.control_v1.bias.zero_()
    x = torch.tensor([[1.0, 3.0], [2.0, 0.0]], dtype=torch.float64)[:, :, None, None]
    x = x.expand(2, 2, 4, 4)  # pooled: (1, 3) and (2, 0)
    # Linear: (1, 3, -2) and (2, 0, 2); BatchNorm1d over the 2 samples (biased var, eps 1e-5):
    # (-1, 1, -1) and (1, -1, 1) up to eps; ReLU: (0, 1, 0) and (1, 0, 1); softmax per sample.
    h = torch.tensor([[1.0, 3.0, -2.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    bn = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    want = F.softmax(bn.clamp_min(0), dim=1)
    torch.testing.assert_close(gate(x), want)
    e = math.e * (1 - 1e-6)  # the BN output is 1 - O(eps): softmax(0, ~1, 0)
    assert gate(x)[0, 1].item() == pytest.approx(e / (e + 2), rel=1e-5)


def test_teacher_is_the_gated_sum_of_branch_logits():
    m = build()
    m.eval()
    x, _ = batches(1)[0]
    with torch.no_grad():
        z, z_e = m.nets.outputs(x)
        s = x
        for name in ("conv1", "bn1", "relu", "layer1", "layer2"):
            s = getattr(m.nets.nets[0], name)(s)
        g = m.nets.gate(s)
    want = sum(g[:, i : i + 1] * z[i] for i in range(3))
    torch.testing.assert_close(z_e, want)
    assert torch.allclose(g.sum(1), torch.ones(4, dtype=torch.float64))


def reference_iteration(nets, gate, x, y, ramp, detach=True, eps=1e-7):
    """Lan1991Xu/ONE_NeurIPS2018 cifar_one.py, written from the spec: the shared stages once,
    m branches, the gate, L = Σ CE(z_i) + CE(z_e) + r · Σ KLε_3(⟂z_e ‖ z_i)."""
    s = x
    for name in ("conv1", "bn1", "relu", "layer1", "layer2"):
        s = getattr(nets[0], name)(s)
    z = [n.fc(n.layer3(s).mean((2, 3))) for n in nets]
    logits = gate.control_v1(s.mean((2, 3)))
    g = F.softmax(F.relu(gate.bn_v1(logits)), dim=1)
    z_e = sum(g[:, i : i + 1] * z[i] for i in range(len(z)))
    target = z_e.detach() if detach else z_e
    q = F.softmax(target / 3, 1) + eps
    loss = F.cross_entropy(z_e, y)
    for zi in z:
        kl = 9 * (q * (q.log() - F.log_softmax(zi / 3, 1))).sum() / zi.size(0)
        loss = loss + F.cross_entropy(zi, y) + ramp * kl
    return loss


@pytest.mark.parametrize("epoch", [1, 41, 90])
@pytest.mark.parametrize("detach", [True, False])
def test_step_matches_the_reference_iteration(epoch, detach):
    m = build(f"distill.detach_teacher={str(detach).lower()}")
    nets, gate = copy.deepcopy(m.nets.nets), copy.deepcopy(m.nets.gate)
    params = list({id(p): p for p in [*nets.parameters(), *gate.parameters()]}.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ramp = math.exp(-5 * (1 - min(epoch - 1, 80) / 80) ** 2)
    m.begin_epoch(epoch)
    assert m.ramp() == pytest.approx(ramp, rel=1e-6)
    for x, y in batches():
        m.step(x, y, epoch)
        for n in [*nets, gate]:
            n.train()
        opt.zero_grad()
        reference_iteration(nets, gate, x, y, ramp, detach=detach).backward()
        opt.step()
    ours = {**{f"nets.{k}": v for k, v in m.nets.nets.state_dict().items()}}
    ours |= {f"gate.{k}": v for k, v in m.nets.gate.state_dict().items()}
    ref = {f"nets.{k}": v for k, v in nets.state_dict().items()}
    ref |= {f"gate.{k}": v for k, v in gate.state_dict().items()}
    for name, want in ref.items():
        if want.is_floating_point():
            err = (ours[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err.item() < 1e-5, name
        else:
            assert torch.equal(ours[name], want), name


def test_ramp_up_and_its_switch():
    m = build()
    for epoch, want in ((1, math.exp(-5)), (41, math.exp(-5 * 0.25)), (81, 1.0), (300, 1.0)):
        m.begin_epoch(epoch)
        assert m.ramp() == pytest.approx(want, rel=1e-6)
    flat = build("distill.rampup_epochs=0")
    flat.begin_epoch(1)
    assert flat.ramp() == 1.0


def test_detach_switch_decides_whether_the_kl_trains_the_gate():
    for detach in (True, False):
        m = build(f"distill.detach_teacher={str(detach).lower()}", "distill.teacher_ce_weight=0")
        m.begin_epoch(81)
        x, y = batches(1)[0]
        m.optimizer.zero_grad()
        total, _ = m.nets(x, y, torch.ones((), dtype=torch.float64))
        total.backward()
        grad = m.nets.gate.control_v1.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) is (not detach)


def test_without_kl_and_teacher_ce_one_is_individual_branches():
    one = build("distill.kl_weight=0", "distill.teacher_ce_weight=0")
    torch.manual_seed(0)
    ind = ffsd.build_method(
        make_cfg(
            *BASE[:3],
            "distill=independent",
            "distill.shared_stages=3",
            "distill.num_networks=3",
        ),
        10,
        "cpu",
    )
    ind.nets.double()
    for m in (one, ind):
        m.begin_epoch(5)
        for x, y in batches():
            m.step(x, y, 5)
    want, got = ind.nets.nets.state_dict(), one.nets.nets.state_dict()
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_deploy_network_is_shared_stages_plus_branch0_under_plain_names():
    m = build()
    m.train_step(*batches(1)[0], 1)
    deployed = m.deploy_model()
    plain = resnet20(num_classes=10).double()
    plain.load_state_dict(deployed.state_dict())  # strict: exactly the backbone's names
    x, _ = batches(1)[0]
    m.eval()
    plain.eval()
    with torch.no_grad():
        z, _ = m.nets.outputs(x)
        torch.testing.assert_close(plain(x).logits, z[0], rtol=0, atol=0)
    assert m.deploy_name == "branch0" and m.primary_metric == "deploy/top1"


def test_evaluate_reports_branches_teacher_ensemble_and_deploy():
    m = build()
    x, y = batches(1)[0]
    out = m.evaluate([(x, y)])
    for key in ("branch0/top1", "branch2/top1", "branch_mean/top1", "teacher/top1"):
        assert key in out
    assert out["deploy/top1"] == out["branch0/top1"]
    m.eval()
    with torch.no_grad():
        z, z_e = m.nets.outputs(x)
    assert out["teacher/top1"] == pytest.approx((z_e.argmax(1) == y).double().mean().item() * 100)
    ens = torch.stack(z).mean(0)
    assert out["ensemble/top1"] == pytest.approx((ens.argmax(1) == y).double().mean().item() * 100)


def test_parameter_count_is_printed_from_the_stage_list():
    m = build()
    text = m.describe()
    total = sum(p.numel() for p in m.nets.parameters())
    assert f"{total:,} parameters" in text and "S2" in text and "other 105" in text  # the gate


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("distill.num_branches=1",), "distill.num_branches=1 is not allowed: must be >= 2"),
        (("model=densenet40",), "not model=densenet40"),
        (("distill.kl_eps=0.5",), "choose one of: 1e-07, 0.0"),
        (("distill.rampup_epochs=-1",), "must be >= 0"),
        (("distill.deploy=3",), "distill.deploy=3 is not allowed: must be <= 2"),
    ],
)
def test_bad_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)
