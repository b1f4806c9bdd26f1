"""The FFSD iteration: faithful to the release's sequence of steps; every term wired, switchable."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ffsd
from ffsd.methods.ffsd import FFSD

from .conftest import make_cfg


def build(*overrides: str, classes: int = 10) -> FFSD:
    cfg = make_cfg("dataset=synthetic", "model=resnet20", "trainer.output_dir=/unused", *overrides)
    torch.manual_seed(0)
    return ffsd.build_method(cfg, classes, "cpu")


def batch(n=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)


# ---- an independent reference: the release's iteration, written from the spec ------------------
# Hook-free but otherwise shaped like the released trainer: one optimizer per network, one
# backward and step per loss in the release's order, decoders toggled between eval() and train().


def _n(v):
    return F.normalize(v.reshape(v.size(0), -1))


def _a(f):
    return f.pow(2).mean(1, keepdim=True)


def _attn(x, y):
    return (_n(x) - _n(y)).pow(2).mean()


def _kl(z, p, temp):
    return F.kl_div(
        F.log_softmax(z / temp, 1), F.softmax(p.detach() / temp, 1), reduction="batchmean"
    )


def _target(y):  # the release's diversity target on an attention map
    norm = y.reshape(y.size(0), -1).norm(dim=1, keepdim=True)
    yn = _n(y)
    thr = yn.topk(int(yn.size(1) / 3), largest=False)[0][:, -1].unsqueeze(-1)
    return (norm / 2 - yn) * torch.sign(yn - thr) + norm / 2, yn, norm


def _shift_feature(f):
    a = _a(f)
    tgt, an, norm = _target(a)
    return f + ((tgt - an) * norm / f.size(1)).view(a.size())


def _sd(decoder, taps, inp):
    decoder.eval()
    outs = decoder(inp.detach())
    return sum(_attn(_a(f), _a(d.detach())) for f, d in zip(taps, outs))


class Reference:
    def __init__(self, method: FFSD):
        nets = copy.deepcopy(method.nets)
        self.students, self.leader, self.fusion = list(nets.students), nets.leader, nets.fusion
        self.decoders, self.leader_decoder = list(nets.decoders), nets.leader_decoder
        sgd = dict(lr=0.1, momentum=0.9, nesterov=True)
        self.opt = [
            torch.optim.SGD(s.parameters(), weight_decay=1e-4, **sgd) for s in self.students
        ]
        self.opt_leader = torch.optim.SGD(self.leader.parameters(), weight_decay=1e-4, **sgd)
        self.opt_fusion = torch.optim.SGD(self.fusion.parameters(), weight_decay=1e-5, **sgd)
        self.opt_dec = [torch.optim.Adam(d.parameters(), weight_decay=1e-4) for d in self.decoders]
        self.opt_ldec = torch.optim.Adam(self.leader_decoder.parameters(), weight_decay=1e-4)
        self.n, self.t = len(self.students), 2.0

    def lambdas(self, epoch, div=1e-5, fusion=10.0, sd=1000.0):
        w = math.exp(-5 * (1 - epoch / 5) ** 2) if epoch <= 5 else 1.0
        return div * w, fusion * w, sd * w

    def step(self, x, y, epoch, student_sd_weight=None, read_losses=False):
        """One iteration; with ``read_losses``, reads each loss to the host as the release logs."""
        read = []
        lam_div, lam_fusion, lam_sd = self.lambdas(epoch)
        lam_ssd = lam_div if student_sd_weight is None else student_sd_weight
        for m in [*self.students, self.leader, self.fusion]:
            m.train()
        lo = self.leader(x)
        outs = [s(x) for s in self.students]
        u = torch.cat([o.taps[-1].detach() for o in outs], 1)
        zf, g = self.fusion(u)
        ens = sum(o.logits for o in outs) / self.n
        for i in range(self.n):
            loss = F.cross_entropy(outs[i].logits, y)
            dml = sum(_kl(outs[i].logits, outs[j].logits, self.t) for j in range(self.n) if j != i)
            loss = loss + self.t**2 * dml / (self.n - 1)
            if i != 0:
                prev = outs[i - 1].taps[-1].detach()
                tgt, _, _ = _target(_a(prev))
                loss = loss + lam_div * (_n(_a(outs[i].taps[-1])) - tgt).pow(2).mean()
                loss = loss + lam_ssd * _sd(
                    self.decoders[i - 1], outs[i].taps, _shift_feature(prev)
                )
            self.opt[i].zero_grad()
            loss.backward()
            self.opt[i].step()
            read += [loss.item()] if read_losses else []
        loss_f = F.cross_entropy(zf, y) + self.t**2 * _kl(zf, ens, self.t)
        self.opt_fusion.zero_grad()
        loss_f.backward()
        self.opt_fusion.step()
        read += [loss_f.item()] if read_losses else []
        loss_l = F.cross_entropy(lo.logits, y) + self.t**2 * _kl(lo.logits, zf, self.t)
        loss_l = loss_l + lam_fusion * _attn(_a(lo.taps[-1]), _a(g.detach()))
        loss_l = loss_l + lam_fusion * _attn(_a(lo.trans), _a(u))
        loss_l = loss_l + lam_fusion * _sd(self.leader_decoder, lo.taps, g.detach())
        self.opt_leader.zero_grad()
        loss_l.backward()
        self.opt_leader.step()
        read += [loss_l.item()] if read_losses else []
        pairs = [
            (self.decoders[i - 1], self.opt_dec[i - 1], outs[i].taps) for i in range(1, self.n)
        ]
        pairs.append((self.leader_decoder, self.opt_ldec, lo.taps))
        for dec, opt, taps in pairs:
            dec.train()
            d = dec(taps[-1].detach())
            loss = sum(
                lam_sd * (_attn(a, f.detach()) + _attn(_a(a), _a(f.detach())))
                for a, f in zip(d, taps)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            read += [loss.item()] if read_losses else []
        return read

    def state(self):
        mods = [*self.students, self.leader, self.fusion, *self.decoders, self.leader_decoder]
        return [t for m in mods for t in m.state_dict().values()]


def method_state(method: FFSD):
    n = method.nets
    mods = [*n.students, n.leader, n.fusion, *n.decoders, n.leader_decoder]
    return [t for m in mods for t in m.state_dict().values()]


@pytest.mark.parametrize(("students", "epochs"), [(2, (1, 1, 6)), (3, (2, 6))])
def test_step_matches_the_release_sequence_of_backwards(students, epochs):
    method = build(f"distill.num_students={students}")
    ref = Reference(method)
    for k, epoch in enumerate(epochs):
        x, y = batch(seed=k)
        method.train_step(x, y, epoch)
        ref.step(x, y, epoch)
    got, want = method_state(method), ref.state()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_corrected_student_sd_weight_option():
    method = build("distill.lambda_student_sd=1000")
    ref = Reference(method)
    x, y = batch()
    method.train_step(x, y, 6)
    ref.step(x, y, 6, student_sd_weight=1000.0)
    for a, b in zip(method_state(method), ref.state()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_step_changes_every_trainable_parameter():
    method = build("distill.num_students=3")
    before = {k: p.detach().clone() for k, p in method.nets.named_parameters()}
    x, y = batch()
    method.train_step(x, y, 6)
    unchanged = [k for k, p in method.nets.named_parameters() if torch.equal(p, before[k])]
    assert unchanged == []
    # ...and the public handles cover every network
    assert len(method.students) == 3 and len(method.decoders) == 2
    handles = [
        *method.students,
        method.leader,
        method.fusion,
        *method.decoders,
        method.leader_decoder,
    ]
    assert sum(1 for h in handles for _ in h.parameters()) == len(before)


def test_train_step_returns_every_documented_term():
    method = build("distill.num_students=3")
    x, y = batch()
    out = method.train_step(x, y, 1)
    expected = set()
    for i in range(3):
        expected |= {f"student{i}/{t}" for t in ("ce", "kd", "loss", "acc")}
    for i in (1, 2):
        expected |= {f"student{i}/diversity", f"student{i}/self_distill"}
        expected |= {f"decoder{i}/{t}" for t in ("feature", "attention", "loss")}
    expected |= {f"fusion/{t}" for t in ("ce", "kd", "loss", "acc")}
    expected |= {
        f"leader/{t}" for t in ("ce", "kd", "fusion", "trans_fusion", "self_distill", "loss", "acc")
    }
    expected |= {f"leader_decoder/{t}" for t in ("feature", "attention", "loss")}
    assert set(out) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    s1 = out["student1/loss"]
    assert s1 == pytest.approx(
        out["student1/ce"]
        + out["student1/kd"]
        + out["student1/diversity"]
        + out["student1/self_distill"],
        rel=1e-5,
    )


def _terms(method, epoch=6):
    x, y = batch()
    method.begin_epoch(epoch)
    _, terms = method.nets(x, y, method._lambda_tensor)
    return {k: v.item() for k, v in terms.items()}


@pytest.mark.parametrize(
    ("override", "zero", "nonzero"),
    [
        (
            "distill.lambda_div=0",
            ["student1/diversity", "student1/self_distill"],
            ["leader/fusion", "decoder1/loss"],
        ),
        ("distill.lambda_student_sd=0", ["student1/self_distill"], ["student1/diversity"]),
        (
            "distill.lambda_fusion=0",
            ["leader/fusion", "leader/trans_fusion", "leader/self_distill"],
            ["student1/diversity"],
        ),
        (
            "distill.lambda_sd=0",
            ["decoder1/feature", "decoder1/attention", "leader_decoder/loss"],
            ["leader/fusion"],
        ),
    ],
)
def test_lambda_zero_turns_each_term_off_exactly(override, zero, nonzero):
    terms = _terms(build(override))
    for k in zero:
        assert terms[k] == 0.0, k
    for k in nonzero:
        assert terms[k] != 0.0, k
    # The student and leader totals are then exactly the remaining terms.
    assert terms["leader/loss"] == pytest.approx(
        terms["leader/ce"]
        + terms["leader/kd"]
        + terms["leader/fusion"]
        + terms["leader/trans_fusion"]
        + terms["leader/self_distill"],
        rel=1e-6,
    )


def test_lambda_zero_removes_the_terms_gradient():
    """λ_fusion = 0: the leader's gradient is exactly that of CE + KD alone."""
    method = build("distill.lambda_fusion=0")
    x, y = batch()
    method.begin_epoch(6)
    params = list(method.leader.parameters())
    snap = copy.deepcopy(method.nets.state_dict())
    total, _ = method.nets(x, y, method._lambda_tensor)
    g_method = torch.autograd.grad(total, params, allow_unused=True)
    method.nets.load_state_dict(snap)  # same BN statistics for the second pass
    lo = method.leader(x)
    with torch.no_grad():
        outs = [s(x) for s in method.students]
        zf, _ = method.fusion(torch.cat([o.taps[-1] for o in outs], 1))
    plain = F.cross_entropy(lo.logits, y) + 4.0 * _kl(lo.logits, zf, 2.0)
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    for name, a, b in zip([n for n, _ in method.leader.named_parameters()], g_method, g_plain):
        if name.startswith("trans_fusion_module"):
            # Only the (zero-weighted) trans-fusion term reaches the head.
            assert b is None and (a is None or torch.count_nonzero(a) == 0), name
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lambda_warmup_applied_per_epoch():
    method = build()
    method.begin_epoch(1)
    w = math.exp(-5 * 0.64)
    lam = method.warmed_lambdas(1)
    assert lam["div"] == pytest.approx(1e-5 * w) and lam["fusion"] == pytest.approx(10 * w)
    assert lam["sd"] == pytest.approx(1000 * w) and lam["student_sd"] == pytest.approx(1e-5 * w)
    assert method.warmed_lambdas(6)["fusion"] == 10.0


def test_learning_rate_schedule_per_epoch():
    method = build("schedule.milestones=[2,3]")
    method.begin_epoch(1)
    assert method.learning_rates() == {"lr/networks": 0.1, "lr/fusion": 0.1, "lr/decoders": 1e-3}
    method.begin_epoch(3)
    assert method.learning_rates()["lr/networks"] == pytest.approx(0.01)
    assert method.learning_rates()["lr/decoders"] == pytest.approx(1e-4)
    method.begin_epoch(4)
    assert method.learning_rates()["lr/fusion"] == pytest.approx(0.001)


def test_linear_warmup_per_iteration_spares_the_decoders():
    method = build("schedule.warmup_epochs=2")
    x, y = batch(n=4)
    method.begin_epoch(1, batches_per_epoch=4)
    lrs = []
    for _ in range(4):
        method.step(x, y, 1)
        lrs.append(method.learning_rates())
    assert [r["lr/networks"] for r in lrs] == pytest.approx([0.1 * k / 8 for k in (1, 2, 3, 4)])
    assert all(r["lr/decoders"] == pytest.approx(1e-3) for r in lrs)


@pytest.mark.parametrize("students", [2, 4])
def test_evaluate_metrics_are_consistent(students):
    method = build(f"distill.num_students={students}", "dataset.topk=[1,5]")
    x, y = batch(n=16)
    for _ in range(2):
        method.train_step(x, y, 6)
    loader = [batch(n=8, seed=5), batch(n=6, seed=6)]
    m = method.evaluate(loader)
    names = [f"student{i}" for i in range(students)] + ["fusion", "leader", "ensemble", "oracle"]
    for name in names:
        for k in (1, 5):
            assert 0.0 <= m[f"{name}/top{k}"] <= 100.0
            assert m[f"{name}/top5"] >= m[f"{name}/top1"]
    student_top1 = [m[f"student{i}/top1"] for i in range(students)]
    assert m["oracle/top1"] >= max(student_top1)
    assert m["students_mean/top1"] == pytest.approx(sum(student_top1) / students)
    # The ensemble is the mean of the students' logits, recomputed here by hand.
    method.eval()
    with torch.no_grad():
        hits = 0
        for xb, yb in loader:
            z = torch.stack([s(xb).logits for s in method.students]).mean(0)
            hits += (z.argmax(1) == yb).sum().item()
    assert m["ensemble/top1"] == pytest.approx(100 * hits / 14)


def test_evaluate_uses_reduce_for_all_counts():
    method = build()
    loader = [batch(n=8)]
    single = method.evaluate(loader)
    doubled = method.evaluate(loader, reduce=lambda t: t * 2)  # two identical ranks
    assert doubled == pytest.approx(single)


def test_any_number_of_classes():
    method = build(classes=7)
    x, y = batch(classes=7)
    out = method.train_step(x, y, 1)
    assert math.isfinite(out["leader/loss"])
    assert method.fusion.fc2.out_features == 7  # the release hard-codes 100 (spec, Quirks 2)


def test_state_dict_round_trip():
    a = build()
    x, y = batch()
    a.train_step(x, y, 1)
    b = build()
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as if through a file: no shared buffers
    a.train_step(x, y, 2)
    b.train_step(x, y, 2)
    for p, q in zip(method_state(a), method_state(b)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_wrap_forward_composes_in_call_order():
    method = build()
    calls = []

    def tag(name):
        def wrapper(fn):
            def wrapped(*args):
                calls.append(name)
                return fn(*args)

            return wrapped

        return wrapper

    method.wrap_forward(tag("inner"))
    method.wrap_forward(tag("outer"))
    x, y = batch()
    method.train_step(x, y, 1)
    assert calls == ["outer", "inner"]
