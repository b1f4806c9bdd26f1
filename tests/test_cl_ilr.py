"""CL-ILR (baselines spec section 4): ILR's backward scaling, the sharing of both forms, the
consensus target, the step against the reimplementations' iterations, the deploy head."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd.config import ConfigError
from ffsd.methods.cl_ilr import consensus, ilr, ilr_factor
from ffsd.models import resnet20
from ffsd.tasks.validation import validate

from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", "distill=cl_ilr")
FORM_B = ("distill=cl_ilr_flat",)


def build(*overrides):
    torch.manual_seed(0)
    m = ffsd.build_method(make_cfg(*BASE, *overrides), 10, "cpu")
    m.nets.double()
    return m


def batches(n=3):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(4, 3, 16, 16, generator=g).double(), torch.randint(10, (4,), generator=g))
        for _ in range(n)
    ]


def test_ilr_is_the_identity_forward_and_scales_the_gradient_backward():
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.5, 4.0, -1.0]], dtype=torch.float64)
    y = ilr(x, 0.25)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, 0.25 * w, rtol=0, atol=0)
    assert ilr(x, 1.0) is x  # no node in the graph where nothing is rescaled


def test_consensus_is_the_leave_one_out_mean_of_logits():
    z = [torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 2.0]]), torch.tensor([[5.0, -2.0]])]
    got = consensus(z)
    torch.testing.assert_close(got[0], torch.tensor([[4.0, 0.0]]))
    torch.testing.assert_close(got[1], torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(got[2], torch.tensor([[2.0, 1.0]]))


@pytest.mark.parametrize(
    ("rule", "stage", "consumers", "want"),
    [
        ("mcl_okd", 1, 2, 0.5),  # S1 feeding G = 2 copies of S2 (K = 4)
        ("mcl_okd", 1, 1, 0.5),  # quirk 1: K = 2, G = 1, still halved
        ("mcl_okd", 1, 3, 0.5),  # quirk 1: K = 5, G = 3, still a half
        ("mcl_okd", 2, 2, 0.5),  # an S2 copy feeding two heads
        ("mcl_okd", 2, 1, 1.0),  # the last copy of an odd K feeds one head
        ("mcl_okd", 0, 1, 1.0),
        ("per_children", 1, 3, 1 / 3),
        ("per_children", 1, 1, 1.0),
        ("per_children", 2, 4, 0.25),  # Form B: 1/K on the shared S2 output
        ("none", 2, 2, 1.0),
    ],
)
def test_ilr_scale_rules(rule, stage, consumers, want):
    assert ilr_factor(rule, stage, consumers) == pytest.approx(want)


@pytest.mark.parametrize("heads", [4, 5])
def test_form_a_shares_s0_s1_by_all_and_s2_by_pairs(heads):
    m = build(f"distill.num_branches={heads}")
    nets = m.nets.nets
    assert all(n.conv1 is nets[0].conv1 and n.layer1 is nets[0].layer1 for n in nets)
    s2 = {id(n.layer2) for n in nets}
    assert len(s2) == math.ceil(heads / 2)
    for h in range(heads):
        assert nets[h].layer2 is nets[2 * (h // 2)].layer2
    assert len({id(n.layer3) for n in nets}) == len({id(n.fc) for n in nets}) == heads
    # Each copy drew its own initialisation.
    assert not torch.equal(nets[0].layer2[0].conv1.weight, nets[2].layer2[0].conv1.weight)


def test_form_b_shares_s0_to_s2():
    m = build(*FORM_B)
    nets = m.nets.nets
    assert all(n.layer2 is nets[0].layer2 for n in nets)
    assert len({id(n.layer3) for n in nets}) == 4
    cfg = make_cfg(*BASE, *FORM_B).distill
    assert (cfg.temperature, cfg.kl_eps, cfg.detach, cfg.rampup_epochs) == (3.0, 1e-7, False, 80)
    assert cfg.beta is None and cfg.ilr_scale == "per_children" and cfg.num_branches == 4


def scaled(x, s):
    """A hand-made ILR for the reference: a tensor hook multiplying the gradient by ``s``."""
    if s == 1:
        return x
    y = x.clone()
    y.register_hook(lambda g: g * s)
    return y


def kl(target, z, t, eps=0.0):
    q = F.softmax(target / t, 1) + eps
    return t * t * (q * (q.log() - F.log_softmax(z / t, 1))).sum() / z.size(0)


def reference_form_a(nets, x, y):
    """winycg/MCL-OKD cl_ilr_resnet.py + main_cifar_cl_ilr.py, written from the spec: S0-S1
    once, ILR(1/2) on S1's output, S2 copy g for heads 2g, 2g+1 with ILR(1/2) when it feeds
    two, L = Σ_h 0.5·CE(z_h) + 0.5·KL_2(⟂mean_{j≠h} z_j ‖ z_h)."""
    k = len(nets)
    s = nets[0].layer1(nets[0].relu(nets[0].bn1(nets[0].conv1(x))))
    s = scaled(s, 0.5)
    z = []
    for g in range((k + 1) // 2):
        heads = [h for h in (2 * g, 2 * g + 1) if h < k]
        t = scaled(nets[2 * g].layer2(s), 0.5 if len(heads) == 2 else 1)
        z += [nets[h].fc(nets[h].layer3(t).mean((2, 3))) for h in heads]
    loss = 0
    for h in range(k):
        target = (sum(z) - z[h]).detach() / (k - 1)
        loss = loss + 0.5 * F.cross_entropy(z[h], y) + 0.5 * kl(target, z[h], 2.0)
    return loss


def reference_form_b(nets, x, y, ramp):
    """DefangChen/OKDDip train_one.py --avg --bpscale, written from the spec: S0-S2 once,
    ILR(1/K) on S2's output, L = Σ CE(z_h) + r_80(e)·Σ KLε_3(mean_{j≠h} z_j ‖ z_h), the target
    not detached."""
    k = len(nets)
    s = nets[0].layer2(nets[0].layer1(nets[0].relu(nets[0].bn1(nets[0].conv1(x)))))
    s = scaled(s, 1 / k)
    z = [n.fc(n.layer3(s).mean((2, 3))) for n in nets]
    loss = 0
    for h in range(k):
        target = (sum(z) - z[h]) / (k - 1)
        loss = loss + F.cross_entropy(z[h], y) + ramp * kl(target, z[h], 3.0, eps=1e-7)
    return loss


@pytest.mark.parametrize(
    ("overrides", "epoch"),
    [((), 1), (("distill.num_branches=3",), 1), (FORM_B, 1), (FORM_B, 41)],
    ids=["A-4-heads", "A-3-heads", "B-epoch1", "B-epoch41"],
)
def test_step_matches_the_reference_iteration(overrides, epoch):
    m = build(*overrides)
    nets = copy.deepcopy(m.nets.nets)  # the deep copy keeps the sharing between heads
    params = list({id(p): p for p in nets.parameters()}.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ramp = math.exp(-5 * (1 - min(epoch - 1, 80) / 80) ** 2)
    form_b = overrides == FORM_B
    m.begin_epoch(epoch)
    assert m.ramp() == pytest.approx(ramp if form_b else 1.0, rel=1e-6)
    for x, y in batches():
        m.step(x, y, epoch)
        nets.train()
        opt.zero_grad()
        ref = reference_form_b(nets, x, y, ramp) if form_b else reference_form_a(nets, x, y)
        ref.backward()
        opt.step()
    ours, ref = m.nets.nets.state_dict(), nets.state_dict()
    assert set(ours) == set(ref)
    for name, want in ref.items():
        if want.is_floating_point():
            err = (ours[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err.item() < 1e-5, name
        else:
            assert torch.equal(ours[name], want), name


def test_rescaling_changes_only_the_shared_stages_gradients():
    grads = {}
    for rule in ("mcl_okd", "none"):
        m = build(f"distill.ilr_scale={rule}")
        x, y = batches(1)[0]
        total, _ = m.nets(x, y, torch.ones((), dtype=torch.float64))
        total.backward()
        grads[rule] = {n: p.grad.clone() for n, p in m.nets.nets.named_parameters()}
    for name, g in grads["none"].items():
        if ".layer3." in name or ".fc." in name:  # below every split point: untouched
            torch.testing.assert_close(grads["mcl_okd"][name], g, rtol=1e-12, atol=0)
    # The stem is behind two halvings (S1's output and each two-head S2 copy).
    stem = "0.conv1.weight"
    assert not torch.allclose(grads["mcl_okd"][stem], grads["none"][stem])


def test_deploy_head_is_its_own_path_under_the_plain_names():
    m = build("distill.deploy=3")
    m.train_step(*batches(1)[0], 1)
    plain = resnet20(num_classes=10).double()
    plain.load_state_dict(m.deploy_model().state_dict())  # strict: the backbone's names
    assert m.deploy_model().layer2 is m.nets.nets[2].layer2  # head 3's S2 is copy 1
    x, _ = batches(1)[0]
    m.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, m.nets.logits(x)[3], rtol=0, atol=0)
    assert m.deploy_name == "branch3" and m.networks()["branch3"] == "nets.nets.3."


def test_evaluate_reports_every_head_and_the_ensemble_of_all_of_them():
    m = build()
    x, y = batches(1)[0]
    out = m.evaluate([(x, y)])
    m.eval()
    with torch.no_grad():
        z = m.nets.logits(x)
    # Quirk 2 not reproduced: the ensemble is the mean of all K heads, not of heads 0..K-2.
    ens = torch.stack(z).mean(0)
    assert out["ensemble/top1"] == pytest.approx((ens.argmax(1) == y).double().mean().item() * 100)
    assert out["deploy/top1"] == out["branch0/top1"]
    assert {f"branch{h}/top1" for h in range(4)} <= set(out) and "branch_mean/top1" in out


def test_parameter_counts_follow_from_the_stage_list():
    m = build("distill.num_branches=5")
    plain = resnet20(num_classes=10)

    def count(*names):
        return sum(p.numel() for n in names for p in getattr(plain, n).parameters())

    s0, s1, s2, s3, head = (
        count("conv1", "bn1"),
        count("layer1"),
        count("layer2"),
        count("layer3"),
        count("fc"),
    )
    total = s0 + s1 + 3 * s2 + 5 * (s3 + head)  # G = 3 copies of S2 for 5 heads
    text = m.describe()
    assert f"5 branches sharing stages: {total:,} parameters" in text
    assert f"S2 {3 * s2:,}" in text and f"head {5 * head:,}" in text and "S2 in 3 copies" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("distill.sharing=tree",), "distill.sharing='tree' is not valid; choose one of: "),
        (("distill.ilr_scale=half",), "choose one of: mcl_okd, per_children, none"),
        (
            ("distill.sharing=flat",),
            "distill.ilr_scale='mcl_okd' is MCL-OKD's rule for hierarchical sharing",
        ),
        (("distill.beta=1.5",), "distill.beta=1.5 is not allowed: must be <= 1"),
        (("distill.num_branches=1",), "distill.num_branches=1 is not allowed: must be >= 2"),
        (("distill.deploy=4",), "distill.deploy=4 is not allowed: must be <= 3"),
        (("model=densenet40",), "not model=densenet40; choose model=resnet20"),
    ],
)
def test_bad_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)
