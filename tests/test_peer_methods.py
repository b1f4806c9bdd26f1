"""Independent, DML and KDCL (baselines spec sections 1, 2, 6): terms by hand, steps against the
references' own iteration, exact reductions, and bad options refused before any work."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd import losses as L
from ffsd.config import ConfigError
from ffsd.methods.kdcl import linear_weights, minlogit_target, project_simplex
from ffsd.tasks.validation import validate

from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused")


def build(method: str, *overrides: str, classes: int = 10, dtype=torch.float32):
    cfg = make_cfg(*BASE, f"distill={method}", *overrides)
    torch.manual_seed(0)
    m = ffsd.build_method(cfg, classes, "cpu")
    for net in m.modules().values():
        net.to(dtype)
    return m


def batch(n=8, classes=10, seed=1, views=1, dtype=torch.float32, size=32):
    g = torch.Generator().manual_seed(seed)
    shape = (views, n, 3, size, size) if views > 1 else (n, 3, size, size)
    return torch.randn(*shape, generator=g).to(dtype), torch.randint(classes, (n,), generator=g)


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kl(t_logits, z_logits, temp):
    """T² · KL(p^T(t) ‖ p^T(z)) of one sample, by hand."""
    q, p = _softmax(t_logits, temp), _softmax(z_logits, temp)
    return temp * temp * sum(a * (math.log(a) - math.log(b)) for a, b in zip(q, p))


# ---- loss terms by hand ----------------------------------------------------------------------
Z = [
    [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]],  # network 0, 2 samples x 3 classes
    [[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]],  # network 1
    [[0.5, 0.5, 3.0], [-1.0, 2.0, 0.0]],  # network 2
]
Y = [1, 2]


def _tensors(dtype=torch.float64):
    return [torch.tensor(z, dtype=dtype) for z in Z], torch.tensor(Y)


def test_minlogit_target_by_hand():
    # t_c = min_k (z_k,c − z_k,y): sample 0 (y=1): net0 gaps (-1, 0, -1.5), net1 (2, 0, 1),
    # net2 (0, 0, 2.5) -> (-1, 0, -1.5); sample 1 (y=2): (-1, -2, 0), (1, 1, 0), (-1, 2, 0).
    z, y = _tensors()
    t = minlogit_target(z, y)
    assert t.tolist() == [[-1.0, 0.0, -1.5], [-1.0, -2.0, 0.0]]


def test_project_simplex_by_hand():
    assert project_simplex(torch.tensor([0.5, 0.5])).tolist() == [0.5, 0.5]
    assert project_simplex(torch.tensor([2.0, 0.0])).tolist() == [1.0, 0.0]
    # (0.7, 0.6, -0.5): theta = 0.15 -> (0.55, 0.45, 0)
    got = project_simplex(torch.tensor([0.7, 0.6, -0.5], dtype=torch.float64))
    assert got.tolist() == pytest.approx([0.55, 0.45, 0.0], abs=1e-12)


def test_linear_weights_minimise_ce_on_the_simplex():
    z, y = _tensors()
    w = linear_weights(z[:2], y, iters=200)
    assert w.min() >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)

    def ce(a):
        return F.cross_entropy(a * z[0] + (1 - a) * z[1], y).item()

    grid = min((ce(a / 1000), a / 1000) for a in range(1001))
    assert ce(float(w[0])) <= grid[0] + 1e-6
    assert float(w[0]) == pytest.approx(grid[1], abs=2e-3)


def _dml(*overrides):
    return build("dml", "distill.num_networks=3", "distill.temperature=2.0", *overrides).nets


def _peers(k, s):
    return [j for j in range(3) if j != k]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), lambda k, s: sum(_kl(Z[j][s], Z[k][s], 2.0) for j in _peers(k, s)) / 2),
        (
            ("distill.reduction=sum",),
            lambda k, s: sum(_kl(Z[j][s], Z[k][s], 2.0) for j in _peers(k, s)),
        ),
        (
            ("distill.target=mean_of_peers",),
            lambda k, s: _kl(
                [sum(Z[j][s][c] for j in _peers(k, s)) / 2 for c in range(3)], Z[k][s], 2.0
            ),
        ),
        (
            ("distill.alpha=0.25",),
            lambda k, s: 0.25 * sum(_kl(Z[j][s], Z[k][s], 2.0) for j in _peers(k, s)) / 2,
        ),
    ],
    ids=["pairwise-mean", "pairwise-sum", "mean-of-peers", "alpha"],
)
def test_dml_mutual_term_by_hand(overrides, expected):
    nets = _dml(*overrides)
    z, _ = _tensors()
    for k in range(3):
        want = sum(expected(k, s) for s in range(2)) / 2
        assert nets.mutual_loss(k, z).item() == pytest.approx(want, rel=1e-12)


def test_dml_kl_eps_is_kl_eps_t():
    nets = _dml("distill.kl_eps=1e-7")
    z, _ = _tensors()
    want = sum(L.kl_t(z[j], z[0], 2.0, eps=L.KL_EPS) for j in (1, 2)) / 2
    assert nets.mutual_loss(0, z).item() == pytest.approx(want.item(), rel=1e-14)


def test_dml_detach_switch_lets_the_target_carry_gradient():
    for detach, peer_grad in ((True, False), (False, True)):
        nets = _dml(f"distill.detach={str(detach).lower()}")
        z = [t.clone().requires_grad_() for t in _tensors()[0]]
        nets.mutual_loss(0, z).backward()
        assert z[0].grad is not None
        assert (z[1].grad is not None and bool(z[1].grad.abs().sum() > 0)) is peer_grad


def test_kdcl_loss_by_hand_for_each_generator():
    z, y = _tensors()
    z = z[:2]
    m = build("kdcl", "distill.views=shared")
    nets = m.nets
    a, temp = 0.5, 4.0
    targets = {
        "mean": [[(Z[0][s][c] + Z[1][s][c]) / 2 for c in range(3)] for s in range(2)],
        "minlogit": minlogit_target(z, y).tolist(),
    }
    for ensemble, t in targets.items():
        nets.ensemble = ensemble
        got_t, teaches = nets.target(z, y)
        assert teaches is None
        torch.testing.assert_close(got_t, torch.tensor(t, dtype=torch.float64))
        for k in range(2):
            ce = F.cross_entropy(z[k], y).item()
            kd = sum(_kl(t[s], Z[k][s], temp) for s in range(2)) / 2
            loss = (1 - a) * ce + a * kd
            got = (1 - a) * F.cross_entropy(z[k], y) + a * L.kl_t(got_t, z[k], temp)
            assert got.item() == pytest.approx(loss, rel=1e-12)


def test_kdcl_naive_picks_the_lowest_ce_teacher_per_batch_or_sample():
    z, y = _tensors()
    z = z[:2]
    nets = build("kdcl").nets
    nets.ensemble = "naive"
    ce = torch.stack([F.cross_entropy(x, y, reduction="none") for x in z])  # 2 x 2
    nets.select = "per_batch"
    t, teaches = nets.target(z, y)
    best = int(ce.mean(1).argmin())
    assert torch.equal(t, z[best]) and teaches[best].all() and not teaches[1 - best].any()
    nets.select = "per_sample"
    t, teaches = nets.target(z, y)
    per = ce.argmin(0)
    for s in range(2):
        assert torch.equal(t[s], z[int(per[s])][s]) and teaches[int(per[s]), s]
    # the teacher of a sample gets no distillation term for it
    m = build("kdcl", "distill.ensemble=naive", "distill.select=per_sample", "distill.views=shared")
    x, labels = batch()
    with torch.no_grad():
        logits = m.nets.logits(x)
        _, terms = m.nets(x, labels)
        t, teaches = m.nets.target(logits, labels)
    for k in range(2):
        keep = ~teaches[k]
        want = sum(_kl(t[s].tolist(), logits[k][s].tolist(), 4.0) for s in range(8) if keep[s]) / 8
        assert terms[f"net{k}/kd"].item() == pytest.approx(0.5 * want, rel=1e-4)


def test_kdcl_network_k_sees_view_k():
    m = build("kdcl", "distill.num_networks=3")
    assert m.num_views == 3
    x, _ = batch(views=3)
    with torch.no_grad():
        m.eval()
        got = m.nets.logits(x)
        for k in range(3):
            assert torch.equal(got[k], m.nets.nets[k](x[k]).logits)
    assert build("kdcl", "distill.views=shared").num_views == 1


# ---- each step against the reference's own iteration -----------------------------------------
SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def reference_losses(method: str, logits, labels, k_nets, opts):
    """Every network's loss as its reference computes it, written from the spec."""
    out = []
    for k in range(k_nets):
        z = logits[k]
        peers = [logits[j].detach() for j in range(k_nets) if j != k]
        if method == "independent":
            out.append(F.cross_entropy(z, labels))
        elif method == "dml":
            t = opts.get("temperature", 1.0)
            kl = sum(
                t
                * t
                * F.kl_div(F.log_softmax(z / t, 1), F.softmax(p / t, 1), reduction="batchmean")
                for p in peers
            )
            out.append(F.cross_entropy(z, labels) + kl / (k_nets - 1))
        elif method == "kdcl":  # shaoeric-KDCL's train.py: the mean of logits, detached
            t = torch.stack([x.detach() for x in logits]).mean(0)
            kl = 16 * F.kl_div(F.log_softmax(z / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
            out.append(0.5 * F.cross_entropy(z, labels) + 0.5 * kl)
    return out


def run_reference(method, nets, opts, batches, views, alternating=False):
    """One SGD per network; each network's own backward and step, in the reference's order."""
    opt = [torch.optim.SGD(n.parameters(), **SGD) for n in nets]
    for x, y in batches:
        for n in nets:
            n.train()
        if alternating:  # the paper's Algorithm 1: recompute with current weights, step k
            for k in range(len(nets)):
                logits = [n(x[i] if views > 1 else x).logits for i, n in enumerate(nets)]
                loss = reference_losses(method, logits, y, len(nets), opts)[k]
                opt[k].zero_grad()
                loss.backward()
                opt[k].step()
            continue
        logits = [n(x[i] if views > 1 else x).logits for i, n in enumerate(nets)]
        losses = reference_losses(method, logits, y, len(nets), opts)
        for k in range(len(nets)):
            opt[k].zero_grad()
            losses[k].backward(retain_graph=True)
            opt[k].step()


def assert_close_states(ours, ref_nets):
    for k, ref in enumerate(ref_nets):
        mine = ours.nets.nets[k].state_dict()
        for name, want in ref.state_dict().items():
            got = mine[name]
            if want.is_floating_point():
                scale = want.abs().max().clamp_min(1e-12)
                assert ((got - want).abs().max() / scale).item() < 1e-5, f"net{k}.{name}"
            else:
                assert torch.equal(got, want), f"net{k}.{name}"


CASES = [
    ("independent", (), {}, False),
    ("dml", (), {}, False),
    ("dml", ("distill.temperature=2.0",), {"temperature": 2.0}, False),
    ("dml", ("distill.update=alternating",), {}, True),
    ("kdcl", ("distill.ensemble=mean",), {}, False),
]


@pytest.mark.parametrize("k_nets", [2, 3])
@pytest.mark.parametrize(("method", "overrides", "opts", "alternating"), CASES)
def test_step_matches_the_reference_iteration(method, overrides, opts, alternating, k_nets):
    m = build(method, f"distill.num_networks={k_nets}", *overrides, dtype=torch.float64)
    ref = [copy.deepcopy(n) for n in m.nets.nets]
    views = m.num_views
    # float64 convolutions are slow on CPUs: 4 images of 16x16 (the CIFAR ResNets pool globally).
    batches = [batch(n=4, seed=s, views=views, dtype=torch.float64, size=16) for s in range(3)]
    m.begin_epoch(1)
    for x, y in batches:
        m.step(x, y, 1)
    run_reference(method, ref, opts, batches, views, alternating)
    assert_close_states(m, ref)


def test_every_parameter_and_buffer_moves_in_one_step():
    for method in ("independent", "dml", "kdcl"):
        m = build(method)
        before = {k: v.clone() for k, v in m.nets.state_dict().items()}
        x, y = batch(views=m.num_views)
        m.train_step(x, y, 1)
        after = m.nets.state_dict()
        moved = [k for k in before if k.endswith(("weight", "running_mean"))]
        assert all(not torch.equal(before[k], after[k]) for k in moved), method


# ---- exact reductions ------------------------------------------------------------------------
def _train_three(method, *overrides):
    m = build(method, *overrides, dtype=torch.float64)
    m.begin_epoch(1)
    for s in range(3):
        m.step(*batch(n=4, seed=s, dtype=torch.float64, size=16), 1)
    return m.nets.state_dict()


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("dml", ("distill.alpha=0",)), ("kdcl", ("distill.alpha=0", "distill.views=shared"))],
)
def test_alpha_zero_is_independent_training(method, overrides):
    want = _train_three("independent")
    got = _train_three(method, *overrides)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_dml_with_t2_k2_is_ffsds_student_ce_plus_kd():
    # baselines spec section 2: with T = 2, K = 2, DML's loss is FFSD's common-student term.
    dml = build("dml", "distill.temperature=2.0", dtype=torch.float64)
    f = build("ffsd", dtype=torch.float64)
    for k in range(2):
        dml.nets.nets[k].load_state_dict(f.nets.students[k].state_dict())
    x, y = batch(dtype=torch.float64)
    lam = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        _, ft = f.nets(x, y, lam)
        _, dt = dml.nets(x, y)
    for k in range(2):
        assert dt[f"net{k}/ce"].item() == pytest.approx(ft[f"student{k}/ce"].item(), rel=1e-12)
        assert dt[f"net{k}/kd"].item() == pytest.approx(ft[f"student{k}/kd"].item(), rel=1e-12)


# ---- evaluation, deploy, state ---------------------------------------------------------------
def test_evaluate_names_mean_std_ensemble_and_deploy():
    m = build("dml", "distill.num_networks=3", "distill.deploy=2")
    x, y = batch(n=16)
    out = m.evaluate([(x[:8], y[:8]), (x[8:], y[8:])])
    per = [out[f"net{k}/top1"] for k in range(3)]
    assert out["net_mean/top1"] == pytest.approx(sum(per) / 3)
    mean = sum(per) / 3
    assert out["net_std/top1"] == pytest.approx(math.sqrt(sum((p - mean) ** 2 for p in per) / 2))
    assert out["deploy/top1"] == out["net2/top1"] and m.primary_metric == "deploy/top1"
    with torch.no_grad():
        m.eval()
        ens = torch.stack([n(x).logits for n in m.nets.nets]).mean(0)
    assert out["ensemble/top1"] == pytest.approx((ens.argmax(1) == y).float().mean().item() * 100)
    assert m.deploy_model() is m.nets.nets[2] and m.deploy_name == "net2"
    assert m.networks() == {f"net{k}": f"nets.nets.{k}." for k in range(3)}


def test_independent_allows_one_network():
    m = build("independent", "distill.num_networks=1")
    out = m.evaluate([batch()])
    assert "net_std/top1" not in out and out["deploy/top1"] == out["net0/top1"]


def test_state_dict_round_trip_lists_the_networks():
    m = build("kdcl")
    x, y = batch(views=2)
    m.train_step(x, y, 1)
    state = m.state_dict()
    assert state["deploy"] == "net0" and set(state["networks"]) == {"net0", "net1"}
    other = build("kdcl")
    other.load_state_dict(state)
    for k, v in m.nets.state_dict().items():
        assert torch.equal(v, other.nets.state_dict()[k])


# ---- bad options, stopped before any work ----------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("distill=dml", "distill.num_networks=1"),
            "distill.num_networks=1 is not allowed: must be >= 2",
        ),
        (
            ("distill=kdcl", "distill.num_networks=1"),
            "distill.num_networks=1 is not allowed: must be >= 2",
        ),
        (("distill=independent", "distill.num_networks=0"), "must be >= 1"),
        (
            ("distill=dml", "distill.target=ensemble"),
            "distill.target='ensemble' is not valid; choose one of: pairwise, mean_of_peers",
        ),
        (("distill=dml", "distill.reduction=max"), "choose one of: mean, sum"),
        (("distill=dml", "distill.update=sequential"), "choose one of: joint, alternating"),
        (
            ("distill=dml", "distill.kl_eps=0.001"),
            "distill.kl_eps=0.001 is not valid; choose one of: 0.0, 1e-07",
        ),
        (("distill=dml", "distill.detach=1"), "distill.detach=1 must be true or false"),
        (("distill=dml", "distill.deploy=2"), "distill.deploy=2 is not allowed: must be <= 1"),
        (("distill=kdcl", "distill.ensemble=general"), "'general' is not implemented"),
        (("distill=kdcl", "distill.ensemble=max"), "choose one of: minlogit, mean, naive, linear"),
        (("distill=kdcl", "distill.views=random"), "choose one of: per_model, shared"),
        (("distill=kdcl", "distill.alpha=1.5"), "distill.alpha=1.5 is not allowed: must be <= 1"),
        (("distill=kdcl", "distill.select=per_epoch"), "choose one of: per_batch, per_sample"),
    ],
)
def test_bad_options_name_key_value_and_choices(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)


def test_constructors_refuse_bad_options_too():
    with pytest.raises(ConfigError, match=r"distill\.num_networks=1"):
        build("dml", "distill.num_networks=1")


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, "distill=dml", "distill.target=x", "distill.update=y"))
    assert "distill.target" in str(err.value) and "distill.update" in str(err.value)


def test_every_default_is_a_valid_choice():
    for method in ("independent", "dml", "kdcl", "ffsd"):
        validate(make_cfg(*BASE, f"distill={method}"))
    for combo in itertools.product(
        ("minlogit", "mean", "naive", "linear"), ("per_batch", "per_sample")
    ):
        validate(
            make_cfg(
                *BASE, "distill=kdcl", f"distill.ensemble={combo[0]}", f"distill.select={combo[1]}"
            )
        )
