"""OKDDip (baselines spec section 5): the attention targets by hand and their gradient, the step
against the reference's iteration, the ramp-up, the switches, the evaluation, the deploy network
(the leader), the parameter counts and the option checks."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffsd
from ffsd import losses as L
from ffsd.config import ConfigError
from ffsd.methods.okddip import attention_targets
from ffsd.models import resnet20
from ffsd.tasks.validation import validate

from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", "distill=okddip")
STEM = ("conv1", "bn1", "relu", "layer1", "layer2")


def build(*overrides):
    torch.manual_seed(0)
    m = ffsd.build_method(make_cfg(*BASE, *overrides), 10, "cpu")
    m.nets.double()
    return m


def batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(4, 3, 8, 8, generator=g).double(), torch.randint(10, (4,), generator=g))
        for _ in range(n)
    ]


def linear(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_attention_target_by_hand():
    # One sample, m = 2 peers, d = 2, projections to width 1, C = 3.
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    z = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]], dtype=torch.float64)
    query = linear(torch.tensor([[1.0, 0.0]], dtype=torch.float64))  # q = (1, 3)
    key = linear(torch.tensor([[0.0, 1.0]], dtype=torch.float64))  # k = (2, 4)
    t, a = attention_targets(h, z, query, key)
    # energy q_i k_j = [[2, 4], [6, 12]]; the softmax runs over j, i included, no 1/sqrt(d).
    a0 = torch.tensor([1.0, math.e**2]) / (1 + math.e**2)
    a1 = torch.tensor([1.0, math.e**6]) / (1 + math.e**6)
    torch.testing.assert_close(a[0], torch.stack([a0, a1]).double())
    want = torch.tensor(
        [[a0[0], 0.0, 2 * a0[1]], [a1[0], 0.0, 2 * a1[1]]], dtype=torch.float64
    )  # t_i = a_i0 z_0 + a_i1 z_1, on logits
    torch.testing.assert_close(t[0], want)


def explicit_targets(h, z, wq, wk):
    """t_i = Σ_j softmax_j(q_i·k_j) z_j with loops and exp/sum, section 5 (b)."""
    m = h.size(1)
    q = [h[:, i] @ wq.T for i in range(m)]
    k = [h[:, j] @ wk.T for j in range(m)]
    out = []
    for i in range(m):
        e = torch.stack([(q[i] * k[j]).sum(1) for j in range(m)], 1).exp()
        a = e / e.sum(1, keepdim=True)
        out.append(sum(a[:, j : j + 1] * z[:, j] for j in range(m)))
    return out


def kl_eps(target, student, eps=1e-7, t=3.0):
    """KLε_T(target ‖ student), written from the spec's notation, the target not detached."""
    q = F.softmax(target / t, 1) + eps
    return t * t * (q * (q.log() - F.log_softmax(student / t, 1))).sum() / student.size(0)


def test_the_gradient_reaches_the_projections_through_the_targets():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 3, 6, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    wq = torch.randn(2, 6, generator=g, dtype=torch.float64)
    wk = torch.randn(2, 6, generator=g, dtype=torch.float64)
    query, key = linear(wq), linear(wk)
    t, _ = attention_targets(h, z, query, key)
    loss = sum(L.kl_t(t[:, i], z[:, i], 3.0, eps=L.KL_EPS, detach=False) for i in range(3))
    loss.backward()

    wq_, wk_ = wq.clone().requires_grad_(), wk.clone().requires_grad_()
    ref = sum(kl_eps(ti, z[:, i]) for i, ti in enumerate(explicit_targets(h, z, wq_, wk_)))
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(query.weight.grad, wq_.grad)
    torch.testing.assert_close(key.weight.grad, wk_.grad)
    assert query.weight.grad.abs().sum() > 0 and key.weight.grad.abs().sum() > 0

    # The same derivative by finite differences, through the module's own function.
    def f(a, b):
        t, _ = attention_targets(h, z, lambda v: v @ a.T, lambda v: v @ b.T)
        return sum(L.kl_t(t[:, i], z[:, i], 3.0, eps=L.KL_EPS, detach=False) for i in range(3))

    assert torch.autograd.gradcheck(f, (wq.clone().requires_grad_(), wk.clone().requires_grad_()))
    # With eps = 0 the KL is torch's kl_div, which must differentiate its target too.
    q0, k0 = linear(wq), linear(wk)
    t, _ = attention_targets(h, z, q0, k0)
    zero = sum(L.kl_t(t[:, i], z[:, i], 3.0, eps=0.0, detach=False) for i in range(3))
    got = torch.autograd.grad(zero, [q0.weight, k0.weight])
    wq_, wk_ = wq.clone().requires_grad_(), wk.clone().requires_grad_()
    ts = explicit_targets(h, z, wq_, wk_)
    want = torch.autograd.grad(sum(kl_eps(ti, z[:, i], 0.0) for i, ti in enumerate(ts)), [wq_, wk_])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)
        assert g_.abs().sum() > 0


def reference_iteration(nets, wq, wk, x, y, ramp, *, eps, detach_leader, shared):
    """DefangChen/OKDDip train_GL.py + resnet_GL.py, written from the spec: the shared stages
    once (or each network's own stem, --MulStu), the pooled features and logits of every branch,
    the attention targets of the peers, the peers' mean for the leader, nothing detached."""
    stem = None
    feats, logits = [], []
    for n in nets:
        s = x
        if stem is None or not shared:
            for name in STEM:
                s = getattr(nets[0] if shared else n, name)(s)
            stem = s
        h = n.layer3(stem).mean((2, 3))
        feats.append(h)
        logits.append(n.fc(h))
    m = len(nets) - 1
    peers = logits[:m]
    targets = explicit_targets(torch.stack(feats[:m], 1), torch.stack(peers, 1), wq, wk)
    z_bar = sum(peers) / m
    loss = F.cross_entropy(logits[m], y)
    kd = kl_eps(z_bar.detach() if detach_leader else z_bar, logits[m], eps)
    for zi, ti in zip(peers, targets):
        loss = loss + F.cross_entropy(zi, y)
        kd = kd + kl_eps(ti, zi, eps)
    return loss + ramp * kd


CASES = [
    # (epoch, detach_leader_target, kl_eps, shared)
    (1, False, 1e-7, True),
    (41, False, 1e-7, True),
    (90, False, 1e-7, True),
    (90, True, 1e-7, True),
    (90, False, 0.0, True),
    (41, False, 1e-7, False),
]


@pytest.mark.parametrize(("epoch", "detach_leader", "eps", "shared"), CASES)
def test_step_matches_the_reference_iteration(epoch, detach_leader, eps, shared):
    m = build(
        f"distill.detach_leader_target={str(detach_leader).lower()}",
        f"distill.kl_eps={eps}",
        f"distill.shared={str(shared).lower()}",
    )
    nets = copy.deepcopy(m.nets.nets)
    wq = m.nets.query_weight.weight.detach().clone().requires_grad_()
    wk = m.nets.key_weight.weight.detach().clone().requires_grad_()
    params = list({id(p): p for p in [*nets.parameters(), wq, wk]}.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ramp = math.exp(-5 * (1 - min(epoch - 1, 80) / 80) ** 2)
    m.begin_epoch(epoch)
    assert m.ramp() == pytest.approx(ramp, rel=1e-6)
    for x, y in batches():
        m.step(x, y, epoch)
        nets.train()
        opt.zero_grad()
        reference_iteration(
            nets, wq, wk, x, y, ramp, eps=eps, detach_leader=detach_leader, shared=shared
        ).backward()
        opt.step()
    ours = {f"nets.{k}": v for k, v in m.nets.nets.state_dict().items()}
    ours |= {"query": m.nets.query_weight.weight, "key": m.nets.key_weight.weight}
    ref = {f"nets.{k}": v for k, v in nets.state_dict().items()} | {"query": wq, "key": wk}
    assert set(ours) == set(ref)
    for name, want in ref.items():
        if want.is_floating_point():
            err = (ours[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err.item() < 1e-5, name
        else:
            assert torch.equal(ours[name], want), name
    # Every branch trained, and the projections moved by more than weight decay alone.
    assert m.nets.query_weight.weight.grad.abs().sum() > 0


def test_projections_learn_only_through_the_targets():
    m = build()
    m.begin_epoch(81)
    x, y = batches(1)[0]
    before = m.nets.query_weight.weight.detach().clone()
    m.step(x, y, 81)
    assert not torch.equal(m.nets.query_weight.weight, before)
    assert m.nets.key_weight.weight.grad.abs().sum() > 0
    # Detaching the peers' targets leaves the projections out of the graph: no gradient, and
    # the optimizer skips them.
    m.optimizer.zero_grad(set_to_none=True)
    z, t, _ = m.nets.outputs(x)
    loss = sum(F.cross_entropy(v, y) for v in z)
    loss = loss + sum(L.kl_t(t[:, i], z[i], 3.0, eps=L.KL_EPS) for i in range(3))
    loss.backward()
    assert m.nets.query_weight.weight.grad is None and m.nets.key_weight.weight.grad is None


def test_ramp_up_weight():
    m = build()
    for epoch, want in ((1, math.exp(-5)), (41, math.exp(-5 * 0.25)), (81, 1.0), (300, 1.0)):
        m.begin_epoch(epoch)
        assert m.ramp() == pytest.approx(want, rel=1e-6)
    flat = build("distill.rampup_epochs=0")
    flat.begin_epoch(1)
    assert flat.ramp() == 1.0
    # The ramp weighs every KL term (the terms are computed before the update), not the CE.
    x, y = batches(1)[0]
    first, late = build(), build()
    a, b = first.train_step(x, y, 1), late.train_step(x, y, 81)
    for name in ("peer0", "peer2", "leader"):
        assert a[f"{name}/ce"] == b[f"{name}/ce"]
        assert a[f"{name}/kd"] == pytest.approx(math.exp(-5) * b[f"{name}/kd"], rel=1e-6)


def grads(m, x, y):
    m.optimizer.zero_grad(set_to_none=True)
    m.nets.train()
    total, _ = m.nets(x, y, torch.ones((), dtype=torch.float64))
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in m.nets.named_parameters()}


def test_detach_leader_target_stops_the_leader_term_at_the_peers():
    x, y = batches(1)[0]
    loss_a, ga = grads(build(), x, y)
    loss_b, gb = grads(build("distill.detach_leader_target=true"), x, y)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in ga:  # the leader's own S3 and head: its term's gradient is unchanged
        if name.startswith("nets.3."):
            assert torch.equal(ga[name], gb[name]), name
    assert not torch.equal(ga["nets.0.fc.weight"], gb["nets.0.fc.weight"])
    # The difference at a peer is exactly the leader term's gradient through z̄.
    m = build()
    m.nets.train()
    z, _, _ = m.nets.outputs(x)
    z_bar = torch.stack(z[:3]).mean(0)
    (want,) = torch.autograd.grad(kl_eps(z_bar, z[3].detach()), m.nets.nets[0].fc.weight)
    torch.testing.assert_close(ga["nets.0.fc.weight"] - gb["nets.0.fc.weight"], want)


def test_kl_eps_zero_changes_only_the_kl_by_order_c_eps():
    x, y = batches(1)[0]
    _, a = build().nets(x, y, torch.ones((), dtype=torch.float64))
    _, b = build("distill.kl_eps=0").nets(x, y, torch.ones((), dtype=torch.float64))
    assert torch.equal(a["peer0/ce"], b["peer0/ce"])
    diff = (a["peer0/kd"] - b["peer0/kd"]).abs().item()
    assert 0 < diff < 9 * 10 * 1e-7 * 30  # T² · C · ε · |log q| at most


def test_shared_false_is_independent_networks_with_the_same_attention():
    m = build("distill.shared=false")
    nets = m.nets.nets
    assert not isinstance(nets, ffsd.models.branches.Branches)
    assert all(nets[0].conv1 is not n.conv1 for n in nets[1:])
    each = sum(p.numel() for p in resnet20(num_classes=10).parameters())
    total = sum(p.numel() for p in m.nets.parameters())
    assert total == 4 * each + 2 * 64 * 8
    assert f"{total:,} parameters (4 x {each:,}, attention 1,024)" in m.describe()
    shared = build()
    assert shared.nets.nets[0].layer2 is shared.nets.nets[3].layer2
    assert shared.nets.nets[0].layer3 is not shared.nets.nets[3].layer3


def test_wrn_projections_read_its_64w_pooled_feature():
    m = build("model=wrn16_2")
    assert m.nets.query_weight.weight.shape == m.nets.key_weight.weight.shape == (16, 128)
    x, y = batches(1)[0]
    terms = m.train_step(x, y, 81)
    assert math.isfinite(terms["leader/loss"]) and m.nets.key_weight.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_every_network_loads_into_the_plain_backbone_and_the_leader_is_deployed(shared):
    m = build(f"distill.shared={str(shared).lower()}")
    m.train_step(*batches(1)[0], 1)
    assert m.deploy_name == "leader" and m.primary_metric == "deploy/top1"
    assert m.networks() == {
        "peer0": "nets.nets.0.",
        "peer1": "nets.nets.1.",
        "peer2": "nets.nets.2.",
        "leader": "nets.nets.3.",
    }
    x, _ = batches(1)[0]
    m.eval()
    with torch.no_grad():
        z, _ = m.nets.eval_logits(x)
    state = m.state_dict()
    assert state["deploy"] == "leader"
    for k, (name, prefix) in enumerate(state["networks"].items()):
        module, _, inner = prefix.partition(".")
        weights = state["modules"][module]
        plain = resnet20(num_classes=10).double().eval()
        plain.load_state_dict(
            {n[len(inner) :]: v for n, v in weights.items() if n.startswith(inner)}
        )
        with torch.no_grad():
            torch.testing.assert_close(plain(x).logits, z[k], rtol=0, atol=0, msg=name)
    plain = resnet20(num_classes=10).double().eval()
    plain.load_state_dict(m.deploy_model().state_dict())  # strict: the backbone's names
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, z[3], rtol=0, atol=0)


def test_evaluate_reports_peers_leader_ensembles_deploy_and_dist():
    m = build()
    data = batches(2)
    out = m.evaluate(data)
    m.eval()
    zs, ys = [], []
    with torch.no_grad():
        for x, y in data:
            zs.append(m.nets.eval_logits(x)[0])
            ys.append(y)
    z = [torch.cat([b[k] for b in zs]) for k in range(4)]
    y = torch.cat(ys)

    def top1(v):
        return (v.argmax(1) == y).double().mean().item() * 100

    for k, name in enumerate(("peer0", "peer1", "peer2", "leader")):
        assert out[f"{name}/top1"] == pytest.approx(top1(z[k]))
    assert out["ensemble/top1"] == pytest.approx(top1(torch.stack(z[:3]).mean(0)))
    assert out["ensemble_all/top1"] == pytest.approx(top1(torch.stack(z).mean(0)))
    assert out["deploy/top1"] == out["leader/top1"] and out["deploy/ce"] == out["leader/ce"]
    peers = [out[f"peer{i}/top1"] for i in range(3)]
    assert out["peer_mean/top1"] == pytest.approx(sum(peers) / 3)
    assert out["peer_std/top1"] == pytest.approx(torch.tensor(peers).std().item())
    p = [F.softmax(v, 1) for v in z[:3]]
    dist = sum((p[i] - p[j]).norm(dim=1) for i, j in itertools.combinations(range(3), 2)) / 3
    assert out["dist"] == pytest.approx(dist.mean().item(), rel=1e-6)
    assert m.epoch_metrics == ("leader/top1", "peer_mean/top1", "ensemble/top1")
    assert m.progress_terms == ("leader/loss", "leader/acc")


def test_parameter_counts_are_printed_from_the_stage_list():
    m = build()
    plain = resnet20(num_classes=10)

    def count(*names):
        return sum(p.numel() for n in names for p in getattr(plain, n).parameters())

    stages = type(plain).stage_modules
    shared = sum(count(*stages[s]) for s in range(3))
    per_branch = count(*stages[3], *stages[4]) + count(*type(plain).head_modules)
    total = shared + 4 * per_branch + 2 * 64 * (64 // 8)
    assert sum(p.numel() for p in m.nets.parameters()) == total
    text = m.describe()
    assert text.startswith(f"3 peers + leader sharing S0-S2: {total:,} parameters")
    assert f"S2 {count(*stages[2]):,}" in text and f"S3 {4 * count(*stages[3]):,}" in text
    assert f"head {4 * count('fc'):,}" in text and "attention 1,024" in text


def test_ddp_sees_every_optimised_parameter():
    m = build()
    m.distribute(lambda module: module)  # raises if forward_fn missed a group's parameters
    held = {id(p) for p in m.forward_fn.parameters()}
    assert id(m.nets.query_weight.weight) in held and id(m.nets.key_weight.weight) in held


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("distill.num_peers=1",), "distill.num_peers=1 is not allowed: must be >= 2"),
        (("model=densenet40",), "not model=densenet40; choose model=resnet20, resnet32"),
        (("distill.kl_eps=0.5",), "distill.kl_eps=0.5 is not valid; choose one of: 1e-07, 0.0"),
        (("distill.rampup_epochs=-1",), "distill.rampup_epochs=-1 is not allowed: must be >= 0"),
        (("distill.attn_factor=0",), "distill.attn_factor=0 is not allowed: must be >= 1"),
        (("distill.attn_factor=65",), "distill.attn_factor=65 is not allowed: must be <= 64"),
        (("distill.temperature=0",), "distill.temperature=0 is not allowed: must be > 0"),
        (("distill.alpha=-1",), "distill.alpha=-1 is not allowed: must be >= 0"),
        (("distill.shared=1",), "distill.shared=1 must be true or false"),
        (("distill.detach_leader_target=yes",), "distill.detach_leader_target='yes' must be"),
    ],
)
def test_bad_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)


def test_network_variant_accepts_any_architecture():
    validate(make_cfg(*BASE, "model=densenet40", "distill.shared=false"))
