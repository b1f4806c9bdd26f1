"""Backbones as stage lists (baselines spec): shared stages, independently initialised branches,
each branch a plain backbone; and the methods built on them (individual branches, DML's stem)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd.config import ConfigError
from ffsd.models import densenet40, resnet20, resnet32, wrn16_2, wrn40_2
from ffsd.models.branches import Branches, BranchingNotSupported
from ffsd.tasks.validation import validate

from .conftest import make_cfg

ARCHS = [resnet20, wrn16_2]


def stage_params(net, names):
    return sum(p.numel() for n in names for p in getattr(net, n).parameters())


@pytest.mark.parametrize("arch", [resnet20, resnet32, wrn16_2, wrn40_2])
def test_parameter_count_from_the_stage_list(arch):
    torch.manual_seed(0)
    plain = arch(num_classes=10)
    stages, head = type(plain).stage_modules, type(plain).head_modules
    per_stage = [stage_params(plain, s) for s in stages]
    own = sum(per_stage[3:]) + stage_params(plain, head)
    assert sum(per_stage[:3]) + own == sum(p.numel() for p in plain.parameters())
    branches = Branches(arch, 10, 3)
    counts = branches.parameter_counts()
    assert counts["total"] == sum(per_stage[:3]) + 3 * own
    assert [counts[f"S{s}"] for s in range(3)] == per_stage[:3]
    assert counts["S3"] == 3 * per_stage[3] and counts["head"] == 3 * stage_params(plain, head)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_branch_is_the_plain_backbone_and_loads_into_it(arch):
    torch.manual_seed(0)
    b = Branches(arch, 10, 3).eval()
    x = torch.randn(4, 3, 32, 32)
    z = b(x)
    for k in range(3):
        plain = arch(num_classes=10)
        assert list(plain.state_dict()) == list(b[k].state_dict())
        plain.load_state_dict(b[k].state_dict())
        assert torch.equal(plain.eval()(x).logits, z[k])


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_stages_are_one_module_and_branches_are_independent(arch):
    torch.manual_seed(0)
    b = Branches(arch, 10, 3)
    for name in ("conv1", "layer1", "layer2"):
        assert getattr(b[0], name) is getattr(b[1], name) is getattr(b[2], name)
    assert b[0].layer3 is not b[1].layer3
    w = [b[k].layer3[0].conv1.weight for k in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # own initialisation
    # each copy drew the backbone's own initialisation: its statistics match a fresh backbone's
    fresh = arch(num_classes=10).layer3[0].conv1.weight
    assert abs(w[1].std().item() - fresh.std().item()) < 0.1 * fresh.std().item()


def test_a_shared_stage_runs_once_per_batch():
    torch.manual_seed(0)
    b = Branches(resnet20, 10, 3)
    plain = copy.deepcopy(b[0])
    x = torch.randn(8, 3, 32, 32)
    b(x)
    plain(x)
    # BatchNorm's running mean moves once per forward: as much as in one plain forward
    torch.testing.assert_close(b[0].bn1.running_mean, plain.bn1.running_mean, rtol=0, atol=0)
    assert b[0].bn1.num_batches_tracked.item() == 1


def test_views_run_each_branch_path_on_its_own_view():
    torch.manual_seed(0)
    b = Branches(resnet20, 10, 2).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    z = b(x)
    for k in range(2):
        assert torch.equal(z[k], b[k](x[k]).logits)


def test_groups_share_per_pair_and_count_consumers():
    torch.manual_seed(0)
    # CL-ILR form A: S0-S1 shared by all 4 heads, S2 by pairs, S3+ per head.
    groups = [[0] * 4, [0] * 4, [0, 0, 1, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    b = Branches(resnet20, 10, 4, groups=groups)
    assert b[0].layer2 is b[1].layer2 and b[2].layer2 is b[3].layer2
    assert b[0].layer2 is not b[2].layer2 and b[0].layer1 is b[3].layer1
    assert b.consumers(1, 0) == 2 and b.consumers(2, 0) == 2 and b.consumers(2, 3) == 2
    flat = Branches(resnet20, 10, 3)
    assert flat.consumers(2, 0) == 3 and flat.consumers(1, 0) == 1
    with pytest.raises(ValueError, match="share stage 2 but not 1"):
        Branches(resnet20, 10, 2, groups=[[0, 0], [0, 1], [0, 0], [0, 1], [0, 1]])


def test_architectures_without_a_stage_list_are_refused_with_the_supported_ones():
    with pytest.raises(BranchingNotSupported, match="resnet20, resnet32, resnet56, wrn16_2"):
        Branches(densenet40, 10, 2)


# ---- methods on shared stages ----------------------------------------------------------------
BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused")
SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def build(*overrides):
    cfg = make_cfg(*BASE, *overrides)
    torch.manual_seed(0)
    m = ffsd.build_method(cfg, 10, "cpu")
    m.nets.double()
    return m


def batches():
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(4, 3, 16, 16, generator=g).double(), torch.randint(10, (4,), generator=g))
        for _ in range(3)
    ]


def reference_forward(nets, x, shared):
    """The references' forward: the shared stages once (e.g. ``extract``), then each branch."""
    names = type(nets[0]).stage_modules
    for stage in names[:shared]:
        for name in stage:
            x = getattr(nets[0], name)(x)
    out = []
    for n in nets:
        h = x
        for stage in names[shared:]:
            for name in stage:
                h = getattr(n, name)(h)
        out.append(n.classify(h))
    return out


def reference_run(nets, loss_fn, shared):
    """One SGD over every parameter and one backward of the summed loss (both references)."""
    params = list({id(p): p for n in nets for p in n.parameters()}.values())
    opt = torch.optim.SGD(params, **SGD)
    for x, y in batches():
        for n in nets:
            n.train()
        opt.zero_grad()
        loss_fn(reference_forward(nets, x, shared), y).backward()
        opt.step()


def assert_same(ours, ref):
    for k, net in enumerate(ref):
        for name, want in net.state_dict().items():
            got = ours[k].state_dict()[name]
            if want.is_floating_point():
                err = (got - want).abs().max() / want.abs().max().clamp_min(1e-12)
                assert err.item() < 1e-5, f"{k}.{name}"


def test_individual_branches_match_one_sgd_over_the_summed_ce():
    m = build("distill=independent", "distill.shared_stages=3", "distill.num_networks=3")
    ref = copy.deepcopy(m.nets.nets)  # deepcopy keeps the sharing between the branches
    assert ref[0].layer1 is ref[2].layer1
    m.begin_epoch(1)
    for x, y in batches():
        m.step(x, y, 1)
    reference_run(ref, lambda z, y: sum(F.cross_entropy(zk, y) for zk in z), shared=3)
    assert_same(m.nets.nets, ref)
    out = m.evaluate([batches()[0]])
    assert {"branch0/top1", "branch_mean/top1", "deploy/top1"} <= out.keys()
    assert m.deploy_name == "branch0"


def test_dml_with_mcl_okds_shared_stem():
    m = build("distill=dml", "distill.share_stem=layer1", "distill.temperature=2.0")
    nets = m.nets.nets
    assert nets[0].layer1 is nets[1].layer1 and nets[0].layer2 is not nets[1].layer2
    ref = copy.deepcopy(nets)

    def loss(z, y):  # winycg/MCL-OKD main_cifar_dml.py: Σ_k CE + 1/(K-1) Σ_l KL_2(⟂z_l ‖ z_k)
        out = 0
        for k, zk in enumerate(z):
            kl = sum(
                4
                * F.kl_div(
                    F.log_softmax(zk / 2, 1), F.softmax(zl.detach() / 2, 1), reduction="batchmean"
                )
                for j, zl in enumerate(z)
                if j != k
            )
            out = out + F.cross_entropy(zk, y) + kl / (len(z) - 1)
        return out

    m.begin_epoch(1)
    for x, y in batches():
        m.step(x, y, 1)
    reference_run(ref, loss, shared=2)
    assert_same(nets, ref)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("distill=independent", "distill.shared_stages=3", "model=densenet40"),
            "not model=densenet40",
        ),
        (("distill=dml", "distill.share_stem=layer2"), "choose one of: false, layer1"),
        (
            ("distill=dml", "distill.share_stem=layer1", "distill.update=alternating"),
            "choose: joint",
        ),
    ],
)
def test_sharing_options_are_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)
