"""FFSD: students, student leader, fusion module and self-distillation decoders (the spec, whole).

:class:`FFSDNetworks` holds every network of one run and computes every loss term of one
iteration in its ``forward`` (spec, "One iteration", steps 1-4 and 6). :class:`FFSD` drives it:
one backward over the sum of all losses, then every optimizer steps. That is exactly the
release's sequence of separate backward passes and steps, because every cross-network signal is
detached and the losses touch disjoint parameters (spec, step 5); the decoders' step may join
the same backward for the same reason (their inputs are this iteration's detached taps).

Loss names returned by ``step`` (weights applied, i.e. each term as it enters its loss):

* ``student{i}/ce``, ``student{i}/kd``, ``student{i}/loss``, ``student{i}/acc`` for every
  student i = 0..N-1 (``student0`` is the spec's S_1); ``student{i}/diversity`` and
  ``student{i}/self_distill`` for i >= 1.
* ``fusion/ce``, ``fusion/kd``, ``fusion/loss``, ``fusion/acc``.
* ``leader/ce``, ``leader/kd``, ``leader/fusion`` (attention to F's map g),
  ``leader/trans_fusion`` (t_L against u), ``leader/self_distill``, ``leader/loss``,
  ``leader/acc``.
* ``decoder{i}/feature``, ``decoder{i}/attention``, ``decoder{i}/loss`` for the decoder of
  student i >= 1, and the same under ``leader_decoder/``.

``acc`` is the training-batch top-1 in percent. ``evaluate`` returns ``<net>/top<k>`` and
``<net>/ce`` for ``student{i}``, ``fusion`` and ``leader``, plus ``students_mean/top<k>``,
``ensemble/top<k>`` (mean of the students' logits), ``ensemble/ce`` and ``oracle/top<k>`` (a
sample counts when *any* student is right: the release's "ensemble accuracy", spec Quirks 4),
and ``deploy/top<k>``, ``deploy/ce``: the leader's, under the name every method uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from ffsd import losses as L
from ffsd.config import Checker
from ffsd.methods.base import OnlineMethod, Reduce, _identity
from ffsd.methods.metrics import batch_accuracy, topk_hits
from ffsd.models.base import TapNet
from ffsd.models.decoder import Decoder
from ffsd.models.fusion import FusionModule
from ffsd.schedules import Schedule

#: Order of the weights packed into the tensor ``FFSDNetworks.forward`` takes.
LAMBDA_KEYS = ("div", "student_sd", "fusion", "sd")


class FFSDNetworks(nn.Module):
    """Every network of an FFSD run, and the loss of one iteration as its ``forward``.

    Parameter names inside: ``students.<i>.*``, ``leader.*``, ``fusion.*``, ``decoders.<j>.*``
    (``decoders[j]`` belongs to student j+1) and ``leader_decoder.*``; each sub-network's own
    names are the release's.
    """

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_students: int,
        temperature: float,
    ) -> None:
        super().__init__()
        if num_students < 2:
            raise ValueError(f"FFSD needs num_students >= 2, got {num_students}")
        self.num_students = num_students
        self.temperature = float(temperature)
        self.students = nn.ModuleList(
            net_factory(num_classes=num_classes, leader=False, num_students=num_students)
            for _ in range(num_students)
        )
        self.leader = net_factory(num_classes=num_classes, leader=True, num_students=num_students)
        taps = self.leader.tap_channels
        self.fusion = FusionModule(taps[-1], num_students, num_classes)
        # Decoder channel paths are the tap channels reversed: 64->32->16 for the CIFAR ResNets,
        # 456->312->168 for DenseNet-40, 1024->832->480 for GoogLeNet (spec, "Decoder D").
        path = tuple(reversed(taps))
        self.decoders = nn.ModuleList(Decoder(path) for _ in range(num_students - 1))
        self.leader_decoder = Decoder(path)

    def forward(self, images: Tensor, labels: Tensor, lambdas: Tensor) -> tuple[Tensor, dict]:
        """All losses of one iteration; returns (sum of every loss, dict of detached terms).

        ``lambdas`` holds the warmed-up (λ_div, λ for the students' SD, λ_fusion, λ_sd).
        """
        lam_div, lam_student_sd, lam_fusion, lam_sd = lambdas.unbind()
        n, t = self.num_students, self.temperature
        terms: dict[str, Tensor] = {}

        # Step 1: forward the leader and every student; F on the detached last taps.
        out_l = self.leader(images)
        outs = [s(images) for s in self.students]
        u = torch.cat([o.taps[-1].detach() for o in outs], 1)
        z_f, g = self.fusion(u)
        z_e = torch.stack([o.logits for o in outs]).mean(0)

        total = images.new_zeros(())
        # Step 2: the students.
        for i, o in enumerate(outs):
            ce = F.cross_entropy(o.logits, labels)
            kd = sum(L.kl_t(outs[j].logits, o.logits, t) for j in range(n) if j != i) / (n - 1)
            loss = ce + kd
            terms[f"student{i}/ce"], terms[f"student{i}/kd"] = ce, kd
            if i >= 1:
                prev = outs[i - 1].taps[-1].detach()
                div = lam_div * L.diversity_loss(o.taps[-1], prev)
                with torch.no_grad():
                    decoded = self.decoders[i - 1](L.shift_feature(prev), frozen=True)
                # Weighted by λ_div in the release, not λ_sd (spec, Quirks 1): the default
                # config sets lambda_student_sd to ${.lambda_div}.
                sd = lam_student_sd * L.self_distillation_loss(o.taps, decoded)
                loss = loss + div + sd
                terms[f"student{i}/diversity"], terms[f"student{i}/self_distill"] = div, sd
            terms[f"student{i}/loss"] = loss
            terms[f"student{i}/acc"] = batch_accuracy(o.logits, labels)
            total = total + loss

        # Step 3: the fusion module learns from the labels and the students' mean logits.
        f_ce = F.cross_entropy(z_f, labels)
        f_kd = L.kl_t(z_e, z_f, t)
        terms["fusion/ce"], terms["fusion/kd"] = f_ce, f_kd
        terms["fusion/loss"] = f_ce + f_kd
        terms["fusion/acc"] = batch_accuracy(z_f, labels)
        total = total + terms["fusion/loss"]

        # Step 4: the leader learns from F's logits, F's map g and the students' fused input u.
        g_det = g.detach()
        l_ce = F.cross_entropy(out_l.logits, labels)
        l_kd = L.kl_t(z_f, out_l.logits, t)
        l_fusion = lam_fusion * L.attn_loss(L.attention(out_l.taps[-1]), L.attention(g_det))
        l_trans = lam_fusion * L.attn_loss(L.attention(out_l.trans), L.attention(u))
        with torch.no_grad():
            decoded = self.leader_decoder(g_det, frozen=True)
        l_sd = lam_fusion * L.self_distillation_loss(out_l.taps, decoded)
        l_loss = l_ce + l_kd + l_fusion + l_trans + l_sd
        terms.update(
            {
                "leader/ce": l_ce,
                "leader/kd": l_kd,
                "leader/fusion": l_fusion,
                "leader/trans_fusion": l_trans,
                "leader/self_distill": l_sd,
                "leader/loss": l_loss,
                "leader/acc": batch_accuracy(out_l.logits, labels),
            }
        )
        total = total + l_loss

        # Step 6: each decoder (train mode) rebuilds its network's taps from the detached last
        # tap. It runs after every frozen use above, as in the release, so that those saw the
        # running statistics from before this iteration.
        pairs = [(f"decoder{i}", self.decoders[i - 1], outs[i].taps) for i in range(1, n)]
        pairs.append(("leader_decoder", self.leader_decoder, out_l.taps))
        for name, decoder, taps in pairs:
            decoded = decoder(taps[-1].detach())
            feat, attn = L.decoder_losses(decoded, taps)
            feat, attn = lam_sd * feat, lam_sd * attn
            terms[f"{name}/feature"], terms[f"{name}/attention"] = feat, attn
            terms[f"{name}/loss"] = feat + attn
            total = total + feat + attn

        return total, {k: v.detach() for k, v in terms.items()}


class FFSD(OnlineMethod):
    """The FFSD method: build with :func:`ffsd.build_method` from a composed config.

    Public attributes: ``students`` (list), ``leader``, ``fusion``, ``decoders`` (list, one per
    student after the first) and ``leader_decoder``; ``nets`` is the :class:`FFSDNetworks`
    container holding them all.
    """

    # The leader is what FFSD ships (spec, "Evaluation"); its best weights keep the release's
    # file name, checkpoints/model_leader_best.pth.
    primary_metric = "leader/top1"
    deploy_name = "leader"
    progress_terms = ("leader/loss", "leader/acc")
    epoch_metrics = ("fusion/top1", "students_mean/top1", "ensemble/top1")

    def __init__(
        self,
        *,
        net: Callable[..., TapNet],
        optim: Mapping[str, Callable[..., torch.optim.Optimizer]],
        schedule: Schedule,
        num_classes: int,
        num_students: int,
        temperature: float,
        lambda_div: float,
        lambda_sd: float,
        lambda_fusion: float,
        lambda_student_sd: float,
        lambda_warmup_epochs: int,
        topk: Sequence[int] = (1,),
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device)
        self.nets = FFSDNetworks(net, num_classes, num_students, temperature).to(self.device)
        self.num_students = num_students
        self.num_classes = num_classes
        self.lambdas = {
            "div": float(lambda_div),
            "student_sd": float(lambda_student_sd),
            "fusion": float(lambda_fusion),
            "sd": float(lambda_sd),
        }
        self.lambda_warmup_epochs = int(lambda_warmup_epochs)
        self.topk = tuple(sorted({int(k) for k in topk}))
        self.schedule = schedule
        nets = self.nets
        # One optimizer per role, one parameter group per network: the same update as the
        # release's one optimizer per network (SGD and Adam act per parameter), with fewer,
        # larger foreach kernels.
        self._optimizers = {
            "networks": optim["networks"](
                [{"params": s.parameters()} for s in nets.students]
                + [{"params": nets.leader.parameters()}]
            ),
            "fusion": optim["fusion"](nets.fusion.parameters()),
            "decoders": optim["decoders"](
                [{"params": d.parameters()} for d in nets.decoders]
                + [{"params": nets.leader_decoder.parameters()}]
            ),
        }
        for opt in self._optimizers.values():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.forward_fn = self.nets
        self._lambda_tensor = torch.zeros(len(LAMBDA_KEYS), device=self.device)

    @classmethod
    def option_errors(cls, cfg: DictConfig, key: str) -> list[str]:
        c, prefix = Checker(cfg), key
        c.number(f"{prefix}.num_students", integer=True, low=2)
        c.number(f"{prefix}.temperature", strict_low=0)
        for lam in ("lambda_div", "lambda_sd", "lambda_fusion", "lambda_student_sd"):
            c.number(f"{prefix}.{lam}", low=0)
        c.number(f"{prefix}.lambda_warmup_epochs", integer=True, low=0)
        return c.errors

    # -- public network handles --------------------------------------------------------------
    @property
    def students(self) -> list[TapNet]:
        return list(self.nets.students)

    @property
    def leader(self) -> TapNet:
        return self.nets.leader

    @property
    def fusion(self) -> FusionModule:
        return self.nets.fusion

    @property
    def decoders(self) -> list[Decoder]:
        return list(self.nets.decoders)

    @property
    def leader_decoder(self) -> Decoder:
        return self.nets.leader_decoder

    def modules(self) -> dict[str, nn.Module]:
        return {"nets": self.nets}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def deploy_model(self) -> nn.Module:
        return self.nets.leader

    def networks(self) -> dict[str, str]:
        return {"leader": "nets.leader."} | {
            f"student{i}": f"nets.students.{i}." for i in range(self.num_students)
        }

    # -- schedule ----------------------------------------------------------------------------
    def warmed_lambdas(self, epoch: int) -> dict[str, float]:
        """Every λ for epoch ``epoch`` (from 1), after the warm-up (spec, "Warm-up")."""
        return {
            k: L.lambda_warmup(v, epoch, self.lambda_warmup_epochs) for k, v in self.lambdas.items()
        }

    def begin_epoch(self, epoch: int, batches_per_epoch: int | None = None) -> None:
        super().begin_epoch(epoch, batches_per_epoch)
        lam = self.warmed_lambdas(epoch)
        self._lambda_tensor = torch.tensor(
            [lam[k] for k in LAMBDA_KEYS], dtype=torch.float32, device=self.device
        )
        self._set_lrs(epoch, 0)

    def _set_lrs(self, epoch: int, it: int) -> None:
        done = epoch - 1
        progress = (it + 1) / self._batches_per_epoch if self._batches_per_epoch else 1.0
        net_factor = self.schedule.factor(done, progress, warmup=True)
        dec_factor = self.schedule.factor(done, progress, warmup=False)
        for name, opt in self._optimizers.items():
            f = dec_factor if name == "decoders" else net_factor
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * f

    def learning_rates(self) -> dict[str, float]:
        return {
            "lr/networks": self._optimizers["networks"].param_groups[0]["lr"],
            "lr/fusion": self._optimizers["fusion"].param_groups[0]["lr"],
            "lr/decoders": self._optimizers["decoders"].param_groups[0]["lr"],
        }

    # -- training ----------------------------------------------------------------------------
    def step(self, images: Tensor, labels: Tensor, epoch: int) -> dict[str, Tensor]:
        if self._epoch != epoch:
            self.begin_epoch(epoch)
        if self.schedule.warmup_epochs and epoch <= self.schedule.warmup_epochs:
            self._set_lrs(epoch, self._iter)
        self._iter += 1
        if not self.nets.training:
            self.nets.train()
        images, labels = self.prepare(images, labels)
        for opt in self._optimizers.values():
            opt.zero_grad(set_to_none=True)
        with self.autocast():
            total, terms = self.forward_fn(images, labels, self._lambda_tensor)
        total.backward()
        for opt in self._optimizers.values():
            opt.step()
        return terms

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Iterable, reduce: Reduce = _identity) -> dict[str, float]:
        """Top-k accuracy (percent) and mean cross-entropy of every network (spec, "Evaluation")."""
        self.eval()
        nets = self.nets
        names = [f"student{i}" for i in range(self.num_students)] + [
            "fusion",
            "leader",
            "ensemble",
            "oracle",
        ]
        ks = self.topk
        # correct[name][k] and ce sums, accumulated on the device; one transfer at the end.
        correct = torch.zeros(len(names), len(ks), device=self.device, dtype=torch.float64)
        ce_sum = torch.zeros(len(names) - 1, device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        for images, labels in loader:
            images, labels = self.prepare(images, labels)
            with self.autocast():
                outs = [s(images) for s in nets.students]
                z_f, _ = nets.fusion(torch.cat([o.taps[-1] for o in outs], 1))
                z_l = nets.leader(images).logits
            z_s = [o.logits for o in outs]
            z_e = torch.stack(z_s).mean(0)
            logits = [*z_s, z_f, z_l, z_e]
            hits = [topk_hits(z, labels, ks) for z in logits]  # each: B x len(ks) bool
            oracle = torch.stack(hits[: self.num_students]).any(0)
            for row, h in enumerate([*hits, oracle]):
                correct[row] += h.sum(0)
            for row, z in enumerate(logits):
                ce_sum[row] += F.cross_entropy(z.float(), labels, reduction="sum")
            count += labels.numel()
        packed = reduce(torch.cat([correct.flatten(), ce_sum, count.reshape(1)]))
        correct = packed[: correct.numel()].reshape(correct.shape)
        ce_sum = packed[correct.numel() : correct.numel() + ce_sum.numel()]
        total = packed[-1].item()
        if total == 0:
            raise ValueError("evaluate() got an empty loader")
        acc = (correct * 100.0 / total).tolist()
        ce = (ce_sum / total).tolist()
        out: dict[str, float] = {}
        for row, name in enumerate(names):
            for col, k in enumerate(ks):
                out[f"{name}/top{k}"] = acc[row][col]
            if name != "oracle":
                out[f"{name}/ce"] = ce[row]
        for col, k in enumerate(ks):
            out[f"students_mean/top{k}"] = sum(acc[i][col] for i in range(self.num_students)) / (
                self.num_students
            )
        # The same names as every other method's deployed network (baselines spec, "Metric
        # names"), so a comparison of methods reads one key.
        for k in ks:
            out[f"deploy/top{k}"] = out[f"leader/top{k}"]
        out["deploy/ce"] = out["leader/ce"]
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["num_students"] = self.num_students
        return state
