"""PCL (baselines spec section 7): the mean-model update and both teacher terms by hand, the ramp
(fixed and shaoeric-PCL's), the step against a reference iteration written from the spec, the
views, the deploy network (EMA shared stages + EMA peer 0), resuming, parameter counts, options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd.config import ConfigError
from ffsd.methods.pcl import ema_alpha, pcl_loss, pcl_rampup
from ffsd.models import resnet20, wrn16_2
from ffsd.tasks.validation import validate

from .conftest import make_cfg

BASE = ("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", "distill=pcl")


def build(*overrides, seed=0):
    torch.manual_seed(seed)
    m = ffsd.build_method(make_cfg(*BASE, *overrides), 10, "cpu")
    m.nets.double()
    m.ema.double()
    return m


def batches(n=3, views=3):
    g = torch.Generator().manual_seed(5)
    shape = (views, 4, 3, 16, 16) if views > 1 else (4, 3, 16, 16)
    return [
        (torch.randn(*shape, generator=g).double(), torch.randint(10, (4,), generator=g))
        for _ in range(n)
    ]


def kl_by_hand(t, z, temp):
    """T² (1/B) Σ_b Σ_c q (log q − log p) from exp and log alone."""
    q = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    p = torch.exp(z / temp) / torch.exp(z / temp).sum(1, keepdim=True)
    return temp * temp * (q * (q.log() - p.log())).sum() / t.shape[0]


def ce_by_hand(z, y):
    return -(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, 1)).mean()


# ---- the mean model ----------------------------------------------------------------------------


def test_alpha_schedule_copies_first_then_averages_then_caps():
    assert ema_alpha(0, 0.999) == 0.0  # the first update is a copy
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(3, 0.999) == pytest.approx(0.75)
    assert ema_alpha(999, 0.999) == pytest.approx(0.999)
    assert ema_alpha(10**6, 0.999) == 0.999


def test_mean_model_update_by_hand_parameters_only():
    m = build("distill.ema_decay=0.6")
    live, mean = list(m.nets.parameters()), list(m.ema.parameters())
    assert all(not p.requires_grad for p in mean)
    optimised = {id(p) for g in m.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in mean}
    assert optimised == {id(p) for p in live}
    # its own draw of the initialisation (quirk: the first step's targets come from it)
    assert not torch.equal(mean[0], live[0])
    with torch.no_grad():  # make the mean model's BN buffers differ from the live model's
        for (_, b), (_, lb) in zip(m.ema.named_buffers(), m.nets.named_buffers()):
            if b.is_floating_point():
                b.add_(0.5)
                lb.sub_(0.25)
    buffers = {k: v.clone() for k, v in m.ema.named_buffers()}
    live_buffers = {k: v.clone() for k, v in m.nets.named_buffers()}
    g = torch.Generator().manual_seed(1)
    for t, alpha in enumerate((0.0, 0.5, 0.6, 0.6)):  # min(1 − 1/(t+1), 0.6)
        with torch.no_grad():
            for p in live:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        want = [alpha * q + (1 - alpha) * p for q, p in zip(mean, live)]
        assert m.update_mean_model() == pytest.approx(alpha)
        assert m.ema_step == t + 1
        for q, w, p in zip(mean, want, live):
            if t == 0:
                assert torch.equal(q, p)
            torch.testing.assert_close(q, w, rtol=1e-12, atol=1e-12)
        for k, b in m.ema.named_buffers():  # parameters only
            assert torch.equal(b, buffers[k]), k
        for k, b in m.nets.named_buffers():
            assert torch.equal(b, live_buffers[k]), k


# ---- the loss terms ----------------------------------------------------------------------------


def test_both_teacher_terms_by_hand_on_numbers():
    # m = 2, T = 1: KL(target [ln 3, 0] ‖ student [0, 0]) = 3/4 ln(3/2) + 1/4 ln(1/2).
    d = torch.float64
    z = [torch.zeros(1, 2, dtype=d), torch.tensor([[math.log(3.0), 0.0]], dtype=d)]
    z_e = torch.tensor([[math.log(3.0), 0.0]], dtype=d)
    z_bar = [torch.tensor([[0.0, math.log(3.0)]], dtype=d), z_e.clone()]
    y = torch.tensor([0])
    total, terms = pcl_loss(z, z_e, z_bar, y, 0.5, 1.0)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert terms["peer0/kd"].item() == pytest.approx(0.5 * kl, rel=1e-12)
    assert terms["peer0/pm"].item() == pytest.approx(0.5 * kl, rel=1e-12)  # peer 1's mean
    assert terms["peer1/kd"].item() == pytest.approx(0.0, abs=1e-15)  # equal distributions
    # peer 1 against the mean of peer 0, [0, ln 3]: KL((1/4, 3/4) ‖ (3/4, 1/4)) = 1/2 ln 3
    assert terms["peer1/pm"].item() == pytest.approx(0.5 * 0.5 * math.log(3.0), rel=1e-12)
    ce0, ce1 = math.log(2.0), math.log(4.0 / 3.0)
    assert terms["peer0/ce"].item() == pytest.approx(ce0, rel=1e-12)
    assert terms["teacher/ce"].item() == pytest.approx(ce1, rel=1e-12)
    want = ce1 + ce0 + ce1 + 0.5 * kl + 0.5 * kl + 0.5 * 0.5 * math.log(3.0)
    assert total.item() == pytest.approx(want, rel=1e-12)


def test_mean_teacher_and_ensemble_terms_by_hand_three_peers():
    g = torch.Generator().manual_seed(3)
    r = lambda: torch.randn(4, 5, generator=g, dtype=torch.float64)  # noqa: E731
    z, z_e, z_bar = [r(), r(), r()], r(), [r(), r(), r()]
    y = torch.tensor([0, 4, 2, 2])
    w, temp = 0.3, 3.0
    total, terms = pcl_loss(z, z_e, z_bar, y, w, temp)
    want = ce_by_hand(z_e, y)
    for i in range(3):
        kd = w * kl_by_hand(z_e, z[i], temp)
        pm = w * sum(kl_by_hand(z_bar[j], z[i], temp) for j in range(3) if j != i) / 2
        torch.testing.assert_close(terms[f"peer{i}/kd"], kd, rtol=1e-12, atol=0)
        torch.testing.assert_close(terms[f"peer{i}/pm"], pm, rtol=1e-12, atol=0)
        torch.testing.assert_close(terms[f"peer{i}/ce"], ce_by_hand(z[i], y), rtol=1e-12, atol=0)
        want = want + ce_by_hand(z[i], y) + kd + pm
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0)


def test_the_ensemble_teacher_learns_only_through_its_cross_entropy():
    g = torch.Generator().manual_seed(4)
    r = lambda: torch.randn(4, 5, generator=g, dtype=torch.float64)  # noqa: E731
    z = [r().requires_grad_() for _ in range(3)]
    z_e, z_bar = r().requires_grad_(), [r().requires_grad_() for _ in range(3)]
    y = torch.tensor([1, 0, 3, 2])
    total, _ = pcl_loss(z, z_e, z_bar, y, 1.0, 3.0)
    total.backward()
    (want,) = torch.autograd.grad(F.cross_entropy(z_e, y), z_e)
    torch.testing.assert_close(z_e.grad, want, rtol=0, atol=0)
    assert all(zb.grad is None for zb in z_bar)  # the mean model's logits are targets only
    # In the model: en_fc's gradient does not depend on the distillation weight.
    m = build()
    x, y = batches(1)[0]
    grads = []
    for w in (0.0, 1.0):
        m.nets.zero_grad(set_to_none=True)
        with torch.no_grad():
            z_bar = m.ema.logits(x)
        total, _ = m.nets(x, y, torch.tensor(w, dtype=torch.float64), z_bar)
        total.backward()
        grads.append([p.grad.clone() for p in m.nets.en_fc.parameters()])
        peer_grad = m.nets.nets[1].layer3[0].conv1.weight.grad.clone()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert peer_grad.abs().sum() > 0


def test_ramp_fixed_r80_and_the_reimplementations_bug():
    for epoch, want in ((1, math.exp(-5)), (41, math.exp(-5 * 0.25)), (81, 1.0), (300, 1.0)):
        assert pcl_rampup(epoch, 80, False) == pytest.approx(want, rel=1e-12)
    bug = {e: pcl_rampup(e, 80, True) for e in range(1, 90)}
    assert bug[1] == pytest.approx(0.0067, abs=1e-4) and bug[1] == pytest.approx(math.exp(-5))
    assert bug[2] == 1.0
    assert bug[3] == pytest.approx(math.exp(-5))
    assert all(bug[e] < 3e-9 for e in range(4, 82))
    assert all(bug[e] == 1.0 for e in range(82, 90))
    m = build("distill.rampup_bug=true")
    for epoch in (1, 2, 3, 50, 82):
        m.begin_epoch(epoch)
        assert m.ramp() == pytest.approx(bug[epoch], rel=1e-6, abs=1e-30)
    flat = build("distill.rampup_epochs=0")
    flat.begin_epoch(1)
    assert flat.ramp() == 1.0


# ---- the step against the reference iteration --------------------------------------------------


def stem(net, x):
    """S0-S2 of the CIFAR ResNet: conv1, bn1, relu, layer1, layer2."""
    return net.layer2(net.layer1(F.relu(net.bn1(net.conv1(x)))))


def peers_forward(model, x, per_view):
    """shaoeric-PCL's forward written from the spec: the stem once per view (peer i on view i),
    each peer's layer3, global average pooling and fc; returns (logits, pooled features)."""
    peers = model.nets
    if per_view:
        s = [stem(peers[0], x[i]) for i in range(len(peers))]
    else:
        s = [stem(peers[0], x)] * len(peers)
    f = [p.layer3(si).mean((2, 3)) for p, si in zip(peers, s)]
    return [p.fc(fi) for p, fi in zip(peers, f)], f


def reference_iteration(live, mean, x, y, w, per_view, temp=3.0):
    with torch.no_grad():
        z_bar, _ = peers_forward(mean, x, per_view)
    z, f = peers_forward(live, x, per_view)
    z_e = live.en_fc(torch.cat(f, 1))
    b, m = y.shape[0], len(z)

    def kl(t, s):
        q = F.softmax(t.detach() / temp, 1)
        return temp * temp * (q * (q.log() - F.log_softmax(s / temp, 1))).sum() / b

    loss = F.cross_entropy(z_e, y)
    for i in range(m):
        pm = sum(kl(z_bar[j], z[i]) for j in range(m) if j != i) / (m - 1)
        loss = loss + F.cross_entropy(z[i], y) + w * kl(z_e, z[i]) + w * pm
    return loss


def reference_ema(live, mean, t, decay=0.999):
    """update_ema_variables: parameters paired by name, buffers left alone."""
    alpha = min(1 - 1 / (t + 1), decay)
    with torch.no_grad():
        for name, p in live.named_parameters():
            mean.get_parameter(name).mul_(alpha).add_(p, alpha=1 - alpha)


def assert_states_close(ours, ref):
    for name, want in ref.items():
        if want.is_floating_point():
            err = (ours[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)
            assert err.item() < 1e-5, name
        else:
            assert torch.equal(ours[name], want), name
    assert set(ours) == set(ref)


@pytest.mark.parametrize(
    ("epoch", "overrides", "w", "per_view"),
    [
        (41, (), math.exp(-5 * 0.25), True),
        # w = 1 from the first step: the mean teacher's random initialisation counts fully.
        (2, ("distill.rampup_bug=true",), 1.0, True),
        (41, ("distill.views=shared",), math.exp(-5 * 0.25), False),
    ],
)
def test_step_matches_the_reference_iteration(epoch, overrides, w, per_view):
    m = build(*overrides)
    live, mean = copy.deepcopy(m.nets), copy.deepcopy(m.ema)
    params = list({id(p): p for p in live.parameters()}.values())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    m.begin_epoch(epoch)
    assert m.ramp() == pytest.approx(w, rel=1e-6)
    assert m.num_views == (3 if per_view else 1)
    for t, (x, y) in enumerate(batches(views=3 if per_view else 1)):
        m.step(x, y, epoch)
        live.train()
        mean.train()
        opt.zero_grad()
        reference_iteration(live, mean, x, y, w, per_view).backward()
        opt.step()
        reference_ema(live, mean, t)
    assert m.ema_step == 3
    assert_states_close(m.nets.state_dict(), live.state_dict())
    assert_states_close(m.ema.state_dict(), mean.state_dict())
    # the mean model's BN statistics come from its own passes (one per view), not the copies
    assert m.ema.nets[0].bn1.num_batches_tracked.item() == (9 if per_view else 3)
    assert not torch.equal(m.ema.nets[0].bn1.running_mean, m.nets.nets[0].bn1.running_mean)


# ---- views, deploy, evaluation -----------------------------------------------------------------


def test_peer_i_sees_view_i_and_the_teacher_sees_every_view():
    m = build()
    x, _ = batches(1)[0]
    x2 = x.clone()
    x2[2] += 1.0
    with torch.no_grad():  # train mode: batch statistics, per view
        (z, z_e), (z2, z_e2) = m.nets.outputs(x), m.nets.outputs(x2)
        zb, zb2 = m.ema.logits(x), m.ema.logits(x2)
    for a, b in ((z, z2), (zb, zb2)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.allclose(a[2], b[2])
    assert not torch.allclose(z_e, z_e2)


def test_deploy_network_is_the_ema_shared_stages_plus_ema_peer0_under_plain_names():
    m = build()
    m.train_step(*batches(1)[0], 1)
    assert m.deploy_name == "ema_peer0" and m.primary_metric == "deploy/top1"
    assert m.deploy_model() is m.ema.nets[0]
    x = batches(1, views=1)[0][0]
    m.eval()
    with torch.no_grad():
        want = m.ema.logits(x)
    plain = resnet20(num_classes=10).double().eval()
    plain.load_state_dict(m.deploy_model().state_dict())  # strict: the backbone's names
    torch.testing.assert_close(plain(x).logits, want[0], rtol=0, atol=0)
    # Every network of networks() comes out of the run state by its prefix.
    state = m.state_dict()
    assert state["deploy"] == "ema_peer0"
    assert set(state["networks"]) == {f"{p}{k}" for p in ("peer", "ema_peer") for k in range(3)}
    for name, where in state["networks"].items():
        module, _, prefix = where.partition(".")
        weights = {
            k[len(prefix) :]: v for k, v in state["modules"][module].items() if k.startswith(prefix)
        }
        net = resnet20(num_classes=10).double().eval()
        net.load_state_dict(weights)
        k = int(name[-1])
        with torch.no_grad():
            ref = want[k] if name.startswith("ema") else m.nets.logits(x)[k]
        torch.testing.assert_close(net(x).logits, ref, rtol=0, atol=0, msg=name)


def test_evaluate_reports_ema_and_live_peers_teacher_ensembles_and_deploy():
    m = build()
    m.train_step(*batches(1)[0], 1)
    x, y = batches(1, views=1)[0]
    out = m.evaluate([(x, y)])
    for key in ("peer_mean/top1", "ema_peer_mean/top1", "ema_peer2/top1", "peer2/top1"):
        assert key in out
    assert out["deploy/top1"] == out["ema_peer0/top1"] and out["deploy/ce"] == out["ema_peer0/ce"]
    with torch.no_grad():
        z, z_e = m.nets.outputs(x)
        zb = m.ema.logits(x)

    def top1(logits):
        return (logits.argmax(1) == y).double().mean().item() * 100

    assert out["teacher/top1"] == pytest.approx(top1(z_e))
    assert out["ensemble/top1"] == pytest.approx(top1(torch.stack(z).mean(0)))
    assert out["ema_ensemble/top1"] == pytest.approx(top1(torch.stack(zb).mean(0)))
    assert out["ema_peer1/top1"] == pytest.approx(top1(zb[1]))
    assert set(m.epoch_metrics) <= set(out)


def test_state_dict_round_trip_resumes_identically():
    data = batches(3)
    a = build()
    a.begin_epoch(41, 3)
    for x, y in data[:2]:
        a.step(x, y, 41)
    state = copy.deepcopy(a.state_dict())
    assert state["ema_step"] == 2
    a.step(*data[2], 41)
    b = build(seed=7)  # other weights everywhere: all of them must come from the state
    b.load_state_dict(state)
    assert b.ema_step == 2
    b.resume_epoch(41, 3, 2)
    b.step(*data[2], 41)
    assert b.ema_step == 3
    for ours, want in ((b.nets, a.nets), (b.ema, a.ema)):
        got, ref = ours.state_dict(), want.state_dict()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_tie_fc_init_starts_every_peers_fc_identical():
    m = build("distill.tie_fc_init=true")
    for model in (m.nets, m.ema):
        peers = model.nets
        for k in (1, 2):
            assert torch.equal(peers[k].fc.weight, peers[0].fc.weight)
            assert torch.equal(peers[k].fc.bias, peers[0].fc.bias)
            assert peers[k].fc is not peers[0].fc
            assert not torch.equal(peers[k].layer3[0].conv1.weight, peers[0].layer3[0].conv1.weight)
    default = build()
    assert not torch.equal(default.nets.nets[1].fc.weight, default.nets.nets[0].fc.weight)


def test_parameter_counts_from_the_stage_list():
    m = build()
    plain = resnet20(num_classes=10)

    def count(names):
        return sum(p.numel() for n in names for p in getattr(plain, n).parameters())

    stages = [count(s) for s in type(plain).stage_modules]
    own = sum(stages[3:]) + count(type(plain).head_modules)
    en_fc = 3 * 64 * 10 + 10
    total = sum(stages[:3]) + 3 * own + en_fc
    text = m.describe()
    assert f"{total:,} trainable parameters" in text
    assert f"S0 {stages[0]:,}, S1 {stages[1]:,}, S2 {stages[2]:,}, S3 {3 * stages[3]:,}" in text
    assert f"en_fc {en_fc:,}" in text
    assert f"mean (EMA) model: {total:,} parameters, not trained" in text


def test_wrn_peers_pool_64w_features():
    m = build("model=wrn16_2")
    assert m.nets.en_fc.in_features == 3 * 128
    m.train_step(*batches(1)[0], 1)
    plain = wrn16_2(num_classes=10).double()
    plain.load_state_dict(m.deploy_model().state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("distill.num_peers=1",), "distill.num_peers=1 is not allowed: must be >= 2"),
        (("distill.temperature=0",), "distill.temperature=0 is not allowed: must be > 0"),
        (("distill.ema_decay=1.5",), "distill.ema_decay=1.5 is not allowed: must be <= 1"),
        (("distill.rampup_epochs=-1",), "distill.rampup_epochs=-1 is not allowed: must be >= 0"),
        (("distill.rampup_bug=maybe",), "distill.rampup_bug='maybe' must be true or false"),
        (("distill.tie_fc_init=1",), "distill.tie_fc_init=1 must be true or false"),
        (
            ("distill.views=mixed",),
            "distill.views='mixed' is not valid; choose one of: per_peer, shared",
        ),
        (("distill.deploy=3",), "distill.deploy=3 is not allowed: must be <= 2"),
        (
            ("model=densenet40",),
            "not model=densenet40; choose model=resnet20, resnet32, resnet56, wrn16_2, wrn40_2",
        ),
    ],
)
def test_bad_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*BASE, *overrides))
    assert message in str(err.value)
