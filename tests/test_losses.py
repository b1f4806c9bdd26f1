"""Each loss helper against values computed by hand (spec, "Helpers") on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from ffsd import losses as L


def t(*values, shape):
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def test_attention_is_channel_mean_of_squares():
    # B=1, C=2, H=1, W=2: channel 0 = [1, 2], channel 1 = [3, 4]
    f = t(1, 2, 3, 4, shape=(1, 2, 1, 2))
    a = L.attention(f)
    assert a.shape == (1, 1, 1, 2)
    assert a.flatten().tolist() == [(1 + 9) / 2, (4 + 16) / 2]


def test_normalize_per_sample_and_zero_safe():
    v = t(3, 4, 0, 0, shape=(2, 2))
    n = L.normalize(v)
    assert n[0].tolist() == pytest.approx([0.6, 0.8])
    # eps 1e-12 keeps an all-zero sample at zero instead of NaN.
    assert n[1].tolist() == [0.0, 0.0]


def test_attn_loss_hand_value():
    x = t(3, 4, shape=(1, 2))
    y = t(4, 3, shape=(1, 2))
    # n(x) = [.6, .8], n(y) = [.8, .6]; mean of squared differences = (.04 + .04) / 2
    assert L.attn_loss(x, y).item() == pytest.approx(0.04)


def test_attn_loss_is_scale_invariant_per_sample():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    scale = torch.tensor([2.0, 5.0, 0.5], dtype=torch.float64).view(3, 1, 1, 1)
    assert L.attn_loss(x * scale, y).item() == pytest.approx(L.attn_loss(x, y).item())


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(z, temp):
    e = [math.exp(v / temp) for v in z]
    s = sum(e)
    return [v / s for v in e]


def test_kl_t_hand_value_batchmean_and_t_squared():
    z = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
    p = [[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    temp = 2.0
    expected = (
        temp**2 * sum(_kl(_softmax(pt, temp), _softmax(zs, temp)) for zs, pt in zip(z, p)) / 2
    )
    got = L.kl_t(torch.tensor(p, dtype=torch.float64), torch.tensor(z, dtype=torch.float64), temp)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kl_t_detaches_the_target_unless_told():
    z = torch.randn(4, 5, requires_grad=True)
    p = torch.randn(4, 5, requires_grad=True)
    L.kl_t(p, z, 2.0).backward()
    assert z.grad is not None and p.grad is None
    L.kl_t(p, z, 2.0, detach=False).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_kl_t_is_zero_for_identical_logits():
    z = torch.randn(4, 7, dtype=torch.float64)
    assert L.kl_t(z.clone(), z, 2.0).item() == pytest.approx(0.0, abs=1e-15)


def test_kl_eps_hand_value_q_plus_eps_not_renormalised():
    # KLε_T (baselines spec, "Notation"): T² (1/B) Σ_b Σ_c (q+ε)(log(q+ε) − log p).
    z = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    temp, eps = 3.0, 1e-7
    expected = 0.0
    for zs, ts in zip(z, t):
        q, p = _softmax(ts, temp), _softmax(zs, temp)
        expected += sum((qi + eps) * (math.log(qi + eps) - math.log(pi)) for qi, pi in zip(q, p))
    expected *= temp**2 / 2
    got = L.kl_t(
        torch.tensor(t, dtype=torch.float64), torch.tensor(z, dtype=torch.float64), temp, eps=eps
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)
    plain = L.kl_t(torch.tensor(t, dtype=torch.float64), torch.tensor(z, dtype=torch.float64), 3.0)
    assert abs(got.item() - plain.item()) < 3 * 9 * eps * 10  # of order C·ε, T² times


@pytest.mark.parametrize(
    ("epoch", "value"),
    # r_80 at e = 1, 41, 81 and later (baselines spec, "Ramp-up"): e^-5, exp(-5·0.5²), 1.
    [(1, math.exp(-5.0)), (41, math.exp(-5 * 0.5**2)), (81, 1.0), (200, 1.0)],
)
def test_ramp_up_uses_the_zero_based_epoch(epoch, value):
    assert L.ramp_up(epoch, 80) == pytest.approx(value, rel=1e-12)
    assert L.ramp_up(41, 80) == pytest.approx(0.2865, abs=1e-4)


def test_sigmoid_rampup_without_length_is_one():
    assert L.sigmoid_rampup(0, 0) == 1.0 and L.ramp_up(1, 0) == 1.0


def test_shift_hand_value():
    # One sample, HW = 6: theta is the floor(6/3) = 2nd smallest normalized value.
    a = t(1, 2, 3, 4, 5, 6, shape=(1, 1, 2, 3))
    m = math.sqrt(sum(v * v for v in range(1, 7)))
    a_hat = [v / m for v in range(1, 7)]
    theta = a_hat[1]
    # (m/2 - â)·sign(â - θ) + m/2: â below θ -> â; at θ -> m/2; above θ -> m - â.
    expected = [
        (m / 2 - ah) * (1 if ah > theta else -1 if ah < theta else 0) + m / 2 for ah in a_hat
    ]
    assert expected[0] == pytest.approx(a_hat[0]) and expected[1] == pytest.approx(m / 2)
    assert L.shift(a).flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_shift_threshold_matches_release_topk():
    # The release picks θ as topk(int(HW/3), largest=False)[0][:, -1].
    a = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    flat = L.normalize(a)
    theta = flat.topk(int(flat.size(1) / 3), largest=False)[0][:, -1:]
    m = a.reshape(4, -1).norm(dim=1, keepdim=True)
    expected = (m / 2 - flat) * torch.sign(flat - theta) + m / 2
    torch.testing.assert_close(L.shift(a), expected, rtol=0, atol=0)


def test_shift_rejects_maps_smaller_than_three():
    with pytest.raises(ValueError, match="at least 3"):
        L.shift(torch.ones(1, 1, 1, 2))


def test_shift_feature_hand_value():
    # B=1, C=2, H=1, W=3
    f = t(1, 0, 2, 1, 2, 2, shape=(1, 2, 1, 3))
    a = [(1 + 1) / 2, (0 + 4) / 2, (4 + 4) / 2]  # A(f) = [1, 2, 4]
    m = math.sqrt(sum(v * v for v in a))
    a_hat = [v / m for v in a]
    theta = sorted(a_hat)[0]  # floor(3/3) = 1st smallest
    shifted = [
        (m / 2 - ah) * (1 if ah > theta else -1 if ah < theta else 0) + m / 2 for ah in a_hat
    ]
    d = [s - ah for s, ah in zip(shifted, a_hat)]
    expected = [[fv + dv * m / 2 for fv, dv in zip(row, d)] for row in ([1, 0, 2], [1, 2, 2])]
    got = L.shift_feature(f)
    assert got.shape == f.shape
    assert got[0, :, 0].tolist() == [pytest.approx(r, rel=1e-12) for r in expected]


def test_diversity_loss_hand_value_and_target_not_renormalized():
    # f: B=1, C=1, 1x3 -> A(f) = f²; f_prev likewise.
    f = t(1, 2, 3, shape=(1, 1, 1, 3))
    f_prev = t(3, 1, 2, shape=(1, 1, 1, 3))
    af = [1, 4, 9]
    nf = [v / math.sqrt(sum(x * x for x in af)) for v in af]
    ap = [9, 1, 4]
    m = math.sqrt(sum(x * x for x in ap))
    ah = [v / m for v in ap]
    theta = sorted(ah)[0]
    target = [(m / 2 - v) * (1 if v > theta else -1 if v < theta else 0) + m / 2 for v in ah]
    expected = sum((x - y) ** 2 for x, y in zip(nf, target)) / 3
    assert L.diversity_loss(f, f_prev).item() == pytest.approx(expected, rel=1e-12)
    # The shifted target holds m/2 and m - â: far from unit norm, i.e. not normalized again.
    assert math.sqrt(sum(v * v for v in target)) > 1.5


def test_diversity_loss_gradient_reaches_only_the_current_student():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    f_prev = torch.randn(2, 3, 4, 4, requires_grad=True)
    L.diversity_loss(f, f_prev).backward()
    assert f.grad is not None and f_prev.grad is None


def test_self_distillation_loss_hand_value():
    # Two taps (k=2) and one decoder output aligned with tap 1.
    f1 = t(1, 2, 3, 4, shape=(1, 1, 2, 2))
    f2 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)  # the last tap is not compared
    d1 = t(2, 2, 2, 2, shape=(1, 1, 2, 2))
    a = [1, 4, 9, 16]
    na = [v / math.sqrt(sum(x * x for x in a)) for v in a]
    nd = [0.5] * 4
    expected = sum((x - y) ** 2 for x, y in zip(na, nd)) / 4
    got = L.self_distillation_loss([f1, f2], [d1])
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_self_distillation_loss_detaches_decoder_outputs():
    f1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    d1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    L.self_distillation_loss([f1, torch.zeros(2, 8, 4, 4)], [d1]).backward()
    assert f1.grad is not None and d1.grad is None


def test_decoder_losses_hand_value():
    d1 = t(1, 0, 0, 1, shape=(1, 2, 1, 2))  # channels [1, 0] and [0, 1]
    f1 = t(1, 1, 1, 1, shape=(1, 2, 1, 2))
    nd = [1 / math.sqrt(2), 0, 0, 1 / math.sqrt(2)]
    nf = [0.5] * 4
    feature = sum((x - y) ** 2 for x, y in zip(nd, nf)) / 4
    # A(d1) = [0.5, 0.5], A(f1) = [1, 1]: equal after normalization.
    feat, attn = L.decoder_losses([d1], [f1, torch.zeros(1, 1, 1, 1)])
    assert feat.item() == pytest.approx(feature, rel=1e-12)
    assert attn.item() == pytest.approx(0.0, abs=1e-15)


def test_decoder_losses_train_only_the_decoder():
    d1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    f1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    feat, attn = L.decoder_losses([d1], [f1, torch.zeros(2, 8, 4, 4)])
    (feat + attn).backward()
    assert d1.grad is not None and f1.grad is None


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [(1, math.exp(-5 * 0.8**2)), (3, math.exp(-5 * 0.4**2)), (5, 1.0), (6, 1.0), (100, 1.0)],
)
def test_lambda_warmup(epoch, factor):
    assert L.lambda_warmup(10.0, epoch, 5) == pytest.approx(10.0 * factor, rel=1e-12)


def test_lambda_warmup_disabled():
    assert L.lambda_warmup(3.0, 1, 0) == 3.0
