"""The loss formulas, term by term: FFSD's (``shared/ffsd-spec.md``, "Helpers", "One iteration")
and those the comparison methods share (``shared/baselines-spec.md``, "Notation").

Every function is pure: tensors in, tensor out, no module state. Shapes: feature maps are
B x C x H x W, attention maps B x 1 x H x W, logits B x classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: eps of the per-sample L2 normalization n(v) (spec, "Helpers"); F.normalize's default.
NORM_EPS = 1e-12


def attention(f: Tensor) -> Tensor:
    """A(f): mean over channels of f², shape B x 1 x H x W (spec, "Helpers").

    Computed as a channel sum divided by C: a mean's backward materializes the gradient it
    spreads over the channels in NCHW order, so a ``channels_last`` network would get an NCHW
    gradient at every tap and run its backward in slow mixed-layout kernels. A sum's backward is a
    broadcast view, and the gradient keeps the feature map's layout.
    """
    return f.pow(2).sum(1, keepdim=True) / f.size(1)


def normalize(v: Tensor) -> Tensor:
    """n(v): per-sample L2 normalization of the flattened tensor, eps 1e-12 (spec, "Helpers")."""
    return F.normalize(v.reshape(v.size(0), -1), p=2.0, dim=1, eps=NORM_EPS)


def _memory_order(v: Tensor, like: Tensor) -> Tensor:
    """``v`` with its dimensions permuted into the order ``like`` is laid out in memory.

    AttnLoss is a mean over elements of per-sample normalized maps, so it does not depend on the
    order in which a sample's elements are flattened, provided x and y share it. Flattening a
    ``channels_last`` map in NHWC order is a view; in NCHW order it is a copy, whose backward
    hands the network an NCHW gradient (see :func:`attention`).
    """
    if (
        like.dim() == 4
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last)
    ):
        return v.permute(0, 2, 3, 1)
    return v


def attn_loss(x: Tensor, y: Tensor) -> Tensor:
    """AttnLoss(x, y) = mean over all elements of (n(x) − n(y))² (spec, "Helpers")."""
    x, y = _memory_order(x, x), _memory_order(y, x)
    return (normalize(x) - normalize(y)).pow(2).mean()


def _shift_parts(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """m = ‖flat a‖ (unnormalized), â = n(a), Shift(a); all flattened to B x HW.

    θ is the ⌊HW/3⌋-th smallest value of â per sample (the release's
    ``topk(int(HW / 3), largest=False)[0][:, -1]``), and
    Shift(a) = (m/2 − â)·sign(â − θ) + m/2 (spec, "Helpers").
    """
    flat = a.reshape(a.size(0), -1)
    hw = flat.size(1)
    k = hw // 3
    if k < 1:
        raise ValueError(
            f"Shift needs an attention map of at least 3 positions, got {tuple(a.shape[1:])}"
        )
    m = flat.norm(p=2, dim=1, keepdim=True)
    a_hat = normalize(flat)
    theta = a_hat.kthvalue(k, dim=1, keepdim=True).values
    shifted = (m / 2 - a_hat) * torch.sign(a_hat - theta) + m / 2
    return m, a_hat, shifted


def shift(a: Tensor) -> Tensor:
    """Shift(a): the diversity target built from an attention map (spec, "Helpers").

    Returned flattened, B x HW, and *not* normalized again (spec, step 2).
    """
    return _shift_parts(a)[2]


def shift_feature(f: Tensor) -> Tensor:
    """ShiftFeature(f) = f + (Shift(a) − â) · m / C, broadcast over f's C channels.

    Spec, "Helpers"; the release's ``diversity_target``.
    """
    a = attention(f)
    m, a_hat, shifted = _shift_parts(a)
    d = (shifted - a_hat) * m / f.size(1)
    return f + d.reshape_as(a)


def diversity_loss(f: Tensor, f_prev: Tensor) -> Tensor:
    """mean((n(A(f)) − Shift(A(f_prev)))²), f_prev detached (spec, step 2, "diversity").

    Unweighted: the caller multiplies by λ_div.
    """
    return (normalize(attention(f)) - shift(attention(f_prev.detach()))).pow(2).mean()


def self_distillation_loss(taps: Sequence[Tensor], decoded: Sequence[Tensor]) -> Tensor:
    """SD: Σ_m AttnLoss(A(f^m), A(d^m)) over m = 1..k−1, the decoder outputs detached.

    ``decoded`` are the decoder's outputs already in reverse order (aligned with
    ``taps[:-1]``), computed by the caller with the decoder in eval mode (spec, step 2).
    """
    if len(decoded) != len(taps) - 1:
        raise ValueError(f"{len(decoded)} decoder outputs for {len(taps)} taps")
    return sum(
        attn_loss(attention(f), attention(d.detach())) for f, d in zip(taps, decoded, strict=False)
    )


def decoder_losses(decoded: Sequence[Tensor], taps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """A decoder's own training terms (spec, step 6), unweighted, targets detached.

    Returns (Σ_m AttnLoss(d^m, f^m), Σ_m AttnLoss(A(d^m), A(f^m))); the caller multiplies
    each by λ_sd.
    """
    if len(decoded) != len(taps) - 1:
        raise ValueError(f"{len(decoded)} decoder outputs for {len(taps)} taps")
    feature = sum(attn_loss(d, f.detach()) for d, f in zip(decoded, taps, strict=False))
    attn = sum(
        attn_loss(attention(d), attention(f.detach())) for d, f in zip(decoded, taps, strict=False)
    )
    return feature, attn


def lambda_warmup(value: float, epoch: int, warmup_epochs: int = 5) -> float:
    """λ · exp(−5·(1 − e/5)²) for epoch e ≤ 5 (epochs from 1), λ afterwards (spec, "Warm-up").

    The sigmoid ramp-up at x = e (ONE and OKDDip call it with e − 1: :func:`ramp_up`).
    """
    return value * sigmoid_rampup(epoch, warmup_epochs)


# -- shared by the online-distillation methods (``shared/baselines-spec.md``, "Notation") ------

#: ε of KLε_T (baselines spec, "Notation": ONE's ``kl_loss.py`` and OKDDip's ``KL_Loss``).
KL_EPS = 1e-7


def kl_t(
    target_logits: Tensor,
    logits: Tensor,
    temperature: float,
    *,
    eps: float = 0.0,
    detach: bool = True,
) -> Tensor:
    """KL_T(t ‖ z) = T² · (1/B) Σ_b Σ_c q_bc (log q_bc − log p_bc), q = p^T(t), p = p^T(z).

    Baselines spec, "Notation": ``batchmean`` KL times T², with the target ``t`` detached unless
    ``detach=False``. ``eps > 0`` gives KLε_T: q replaced by q + ε, not renormalised (ONE and
    OKDDip, ``eps=KL_EPS``). FFSD's KD(z, p) (ffsd spec, "Helpers") is ``kl_t(p, z, T)``.
    """
    t = temperature
    target = target_logits.detach() if detach else target_logits
    log_p = F.log_softmax(logits / t, dim=1)
    q = F.softmax(target / t, dim=1)
    if eps:
        q = q + eps
        return (t * t) * (q * (q.log() - log_p)).sum(1).mean()
    return (t * t) * F.kl_div(log_p, q, reduction="batchmean")


def sigmoid_rampup(x: float, length: float) -> float:
    """exp(−5 · (1 − min(x, L)/L)²) for x ≥ 0; 1 when L = 0.

    The "sigmoid ramp-up" of ONE (``utils/ramps.py``) and OKDDip (baselines spec, "Ramp-up"),
    and FFSD's λ warm-up (ffsd spec, "Warm-up"); the callers differ only in what they pass as x.
    """
    if length <= 0:
        return 1.0
    x = min(max(float(x), 0.0), float(length))
    return math.exp(-5.0 * (1.0 - x / length) ** 2)


def ramp_up(epoch: int, length: int) -> float:
    """r_L(e) with the 0-based epoch e0 = e − 1, as ONE and OKDDip call it (baselines spec)."""
    return sigmoid_rampup(epoch - 1, length)
