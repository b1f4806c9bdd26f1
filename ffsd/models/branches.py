"""K branches of one backbone that share its low stages (``shared/baselines-spec.md``,
"Backbones as stage lists").

A backbone with ``stage_modules`` (the CIFAR ResNets and the WRNs) is split at its stages
S0..S4. :class:`Branches` holds K complete copies of the backbone, each built (and so
initialised) independently with the backbone's own initialisation, and then makes copies share
stage modules: with ``shared_stages = 3`` (the spec's split rule, ONE, OKDDip, PCL, individual
branches) every branch uses copy 0's S0-S2, and copy k keeps its own S3, S4 and head. Sharing can
also be per group (``groups``: CL-ILR shares S2 between pairs of heads).

Branch k is therefore itself a plain backbone module (``branches[k]``) whose S0-S2 are
the same module objects as every other branch's: its ``state_dict`` has the plain backbone's
parameter names, it loads into ``ffsd.models.<arch>(num_classes=...)`` and gives the same logits.
That is the deployable network the spec asks for, with no copying or renaming.

The forward pass computes each shared stage once per input and feeds its output to every branch
that shares it (so a shared BatchNorm sees one batch and updates its running statistics once);
with views (one input per branch, PCL), each branch's whole path runs on its own view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ffsd.models.base import TapNet

#: Stages of the split rule that branches share by default (S0, S1, S2).
SPLIT_RULE = 3


class BranchingNotSupported(ValueError):
    """The architecture has no stage list (the spec does not say where to split it)."""


def stage_list(net: TapNet) -> tuple[tuple[str, ...], ...]:
    """``net``'s stages S0..S4, or :class:`BranchingNotSupported` naming the supported ones."""
    stages = type(net).stage_modules
    if stages is None:
        raise BranchingNotSupported(
            f"{type(net).__name__} has no stage list: the baselines spec splits only the CIFAR "
            "ResNets and WRNs into shared stages and branches; choose model=resnet20, resnet32, "
            "resnet56, wrn16_2, wrn40_2 or wrn28_10"
        )
    return stages


def sharing_groups(num_branches: int, shared_stages: int, stages: int) -> list[list[int]]:
    """Per stage, the group of each branch: all in group 0 below ``shared_stages``, own above."""
    return [
        [0] * num_branches if s < shared_stages else list(range(num_branches))
        for s in range(stages)
    ]


class Branches(nn.ModuleList):
    """K backbone copies sharing stage modules per ``groups`` (see module docstring).

    A ``ModuleList`` of the K branches (``branches[k]`` is branch k as a plain backbone), with
    the stage-wise forward that computes each shared stage once.

    ``groups[s][k]`` is the group of branch k at stage s; branches in one group share that
    stage (the modules of the group's first branch). A branch's groups must refine as the stages
    go deeper (branches that part never share again), so the branches form a tree.
    """

    def __init__(
        self,
        net_factory: Callable[..., TapNet],
        num_classes: int,
        num_branches: int,
        *,
        shared_stages: int = SPLIT_RULE,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        nets = [
            net_factory(num_classes=num_classes, leader=False, num_students=num_branches)
            for _ in range(num_branches)
        ]
        stages = stage_list(nets[0])
        if groups is None:
            groups = sharing_groups(num_branches, shared_stages, len(stages))
        groups = [list(g) for g in groups]
        if len(groups) != len(stages) or any(len(g) != num_branches for g in groups):
            raise ValueError(f"groups must give {len(stages)} stages x {num_branches} ids")
        for s in range(1, len(groups)):
            for a in range(num_branches):
                for b in range(num_branches):
                    if groups[s][a] == groups[s][b] and groups[s - 1][a] != groups[s - 1][b]:
                        raise ValueError(f"branches {a} and {b} share stage {s} but not {s - 1}")
        # The first branch of each group owns the stage; the others point at its modules.
        for s, names in enumerate(stages):
            owner: dict[int, int] = {}
            for k in range(num_branches):
                first = owner.setdefault(groups[s][k], k)
                if first != k:
                    for name in names:
                        setattr(nets[k], name, getattr(nets[first], name))
        super().__init__(nets)
        self.stages, self.groups, self.num_branches = stages, groups, int(num_branches)

    def owners(self, stage: int) -> list[int]:
        """The branch that owns each distinct module of ``stage`` (its group's first branch)."""
        seen: dict[int, int] = {}
        for k, g in enumerate(self.groups[stage]):
            seen.setdefault(g, k)
        return list(seen.values())

    def consumers(self, stage: int, k: int) -> int:
        """How many distinct modules of stage ``stage + 1`` read branch k's ``stage`` output."""
        if stage + 1 >= len(self.stages):
            return 1
        members = [b for b, g in enumerate(self.groups[stage]) if g == self.groups[stage][k]]
        return len({self.groups[stage + 1][b] for b in members})

    def run_stage(self, k: int, stage: int, x: Tensor) -> Tensor:
        for name in self.stages[stage]:
            x = getattr(self[k], name)(x)
        return x

    def forward_features(
        self,
        images: Tensor,
        hook: Callable[[int, Tensor, int], Tensor] | None = None,
    ) -> list[list[Tensor]]:
        """Per branch, the output of every stage S0..S4 (shared outputs are the same tensor).

        ``images`` is B x C x H x W, or branches x B x C x H x W (branch k on view k: every
        stage is then run per branch). ``hook(stage, out, consumers)`` may replace a stage's
        output before the next stage reads it; ``consumers`` is how many distinct modules of
        the next stage read it (CL-ILR's gradient rescaling).
        """
        k_all = range(self.num_branches)
        per_view = images.dim() == 5
        outs: list[list[Tensor]] = [[] for _ in k_all]
        for s in range(len(self.stages)):
            done: dict[tuple[int, int], Tensor] = {}
            for k in k_all:
                owner = self.groups[s].index(self.groups[s][k])
                parent = outs[k][-1] if s else (images[k] if per_view else images)
                key = (owner, k if per_view else owner)
                if key not in done:
                    out = self.run_stage(owner, s, parent)
                    if hook is not None:
                        out = hook(s, out, 1 if per_view else self.consumers(s, k))
                    done[key] = out
                outs[k].append(done[key])
        return outs

    def forward(self, images: Tensor) -> list[Tensor]:
        """Every branch's logits."""
        return [
            self[k].classify(feats[-1]) for k, feats in enumerate(self.forward_features(images))
        ]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: ``total`` (each shared one once) and per stage owner."""
        out: dict[str, int] = {}
        for s, names in enumerate(self.stages):
            for k in self.owners(s):
                n = sum(p.numel() for name in names for p in getattr(self[k], name).parameters())
                out[f"S{s}"] = out.get(f"S{s}", 0) + n
        out["head"] = sum(
            p.numel() for net in self for name in type(net).head_modules
            for p in getattr(net, name).parameters()
        )  # fmt: skip
        out["total"] = sum(p.numel() for p in self.parameters())
        return out
