"""One network's weights from any checkpoint file, with what can be inferred and clear errors.

Reads (always with ``torch.load(weights_only=True)``, after checking the archive's checksums,
through :func:`ffsd.training.checkpoint.safe_load`):

* the released code's files and this project's ``checkpoints/model_<deploy>_best.pth``:
  ``{"weight": state_dict, "epoch", "cfg": model name, "index": "leader" | "0" | "1" | ...}``
  (other methods' files carry their network's name, ``net0``, as index);
* this project's run state ``checkpoints/last.pt`` (``format: ffsd-state``), which holds every
  network of any method and lists where each one's weights are (``method.networks``, and the
  deployed one, ``method.deploy``; FFSD: the leader under ``nets.leader.*``, student i under
  ``nets.students.<i>.*``);
* a bare ``state_dict`` of one network.

From the weights alone it infers whether the network is a leader (it has the trans-fusion head
``trans_fusion_module.*``), how many students the leader was trained with (the head's last 1x1
convolution maps C to C·N channels), and the class count (rows of the classifier, the last 2-D
weight). A file that does not fit the configured model and dataset gets a :class:`CheckpointError`
naming the file, the first missing/unexpected keys and shape mismatches, and, when the weights
match another architecture of ``conf/model/``, that architecture's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ffsd.config import CONF_DIR, ConfigError, group_options
from ffsd.models.base import TapNet
from ffsd.training.checkpoint import (
    STATE_FORMAT,
    CheckpointError,
    name_tensors,
    nonfinite_tensors,
    safe_load,
)

#: Prefix of the leader's trans-fusion head (release name; spec, "Checkpoints of the release").
HEAD = "trans_fusion_module."
#: Wrapper prefixes a state_dict may carry: DataParallel/DDP (``module.``), torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: The release's model names (its ``cfg`` field) that differ from ours.
RELEASE_MODEL_NAMES = {
    "wideresnet1602": "wrn16_2",
    "wideresnet4002": "wrn40_2",
    "densenet": "densenet40",
}
#: How many keys of each kind a mismatch message lists.
SHOW = 5

#: ``task.network``: auto, FFSD's leader/student<i>, or another method's net<k>, branch<k>, peer<k>
#: (the names its run state lists; ``OnlineMethod.networks``).
NETWORK_PATTERN = re.compile(r"^(auto|all|leader|(student|net|branch|peer|ema_peer)\d+)$")
#: Release-format ``index`` values of networks other methods save (``model_<name>_best.pth``).
NAMED_INDEX = re.compile(r"^(student|net|branch|peer|ema_peer)\d+$")


@dataclass
class NetworkCheckpoint:
    """One network's weights read from ``path`` and what the file says or implies about it."""

    path: Path
    #: ``release`` (``{"weight", "epoch", "cfg", "index"}``), ``run-state`` or ``state_dict``.
    kind: str
    #: ``leader``, ``student<i>`` or ``unknown`` (a bare state_dict of a student).
    network: str
    leader: bool
    #: Students the leader was trained with (head width; run state: networks it holds).
    num_students: int | None
    num_classes: int | None
    epoch: int | None
    #: The model name recorded in the file (release ``cfg``; run-state fingerprint), if any.
    recorded_model: str | None
    state: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)
    #: Every network a run state holds (``OnlineMethod.networks``); empty for one-network files.
    run_networks: tuple[str, ...] = ()
    #: Weight tensors holding NaN or infinite values (also a note; ``task=eval`` warns).
    nonfinite: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.nonfinite = nonfinite_tensors(self.state)
        if self.nonfinite:
            self.notes.append(
                f"{len(self.nonfinite)} weight tensors are not finite (NaN or infinite values): "
                f"{name_tensors(self.nonfinite)}"
            )

    def inferred(self) -> dict[str, Any]:
        """What was inferred, as plain values (for ``eval.json`` / ``export.json``)."""
        return (
            {
                "checkpoint": str(self.path),
                "kind": self.kind,
                "network": self.network,
                "leader": self.leader,
                "num_students": self.num_students,
                "num_classes": self.num_classes,
                "epoch": self.epoch,
                "recorded_model": self.recorded_model,
            }
            | ({"run_networks": list(self.run_networks)} if self.run_networks else {})
            | ({"nonfinite_weights": list(self.nonfinite)} if self.nonfinite else {})
        )

    def describe(self) -> str:
        """A few lines saying what the file is and what was inferred from it."""
        kinds = {
            "release": "release format {weight, epoch, cfg, index}",
            "run-state": "ffsd run state (every network of a run)",
            "state_dict": "bare state_dict of one network",
        }
        who = self.network if self.network != "unknown" else "a student (no trans-fusion head)"
        if self.leader:
            head = self.state[HEAD + "conv1_1.weight"].shape
            students = (
                f"{self.num_students} students (trans-fusion head {head[1]} -> {head[0]} "
                f"channels = {head[1]} x {self.num_students})"
            )
        elif self.run_networks and not any(n.startswith("student") for n in self.run_networks):
            students = f"networks in the run: {', '.join(self.run_networks)}"
        elif self.num_students is not None:
            students = f"{self.num_students} students in the run"
        else:
            students = "students: unknown (a student's weights do not record it)"
        lines = [
            f"checkpoint {self.path}: {kinds[self.kind]}",
            f"  network: {who}; {students}",
            f"  classes: {self.num_classes}; epoch: {self.epoch if self.epoch is not None else '?'}"
            f"; model recorded in the file: {self.recorded_model or 'none'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def require_checkpoint(cfg: DictConfig, task: str) -> Path:
    """``cfg.checkpoint`` as a path; a :class:`ConfigError` naming the key when it is unset."""
    value = cfg.get("checkpoint")
    if value is None or str(value).strip() == "":
        raise ConfigError(
            f"checkpoint={value!r}: task={task} needs the checkpoint file to read; add "
            "checkpoint=PATH (the release's model<index>_best.pth, or this project's "
            "<run>/checkpoints/model_leader_best.pth or <run>/checkpoints/last.pt)"
        )
    return Path(str(value)).expanduser()


def check_network_choice(network: str, key: str) -> None:
    """``auto``, ``leader``, ``student<i>``, ``net<k>``, ``branch<k>`` or ``peer<k>``.

    Anything else is a :class:`ConfigError` naming ``key``; whether the file holds that network
    is checked when it is read.
    """
    if not isinstance(network, str) or not NETWORK_PATTERN.match(network):
        raise ConfigError(
            f"{key}={network!r} is not valid; choose one of: auto, all (every network of a run "
            "state), leader, student<i> (FFSD), net<k> (independent, DML, KDCL), branch<k> (ONE, "
            "CL-ILR), peer<k> (OKDDip, PCL), ema_peer<k> (PCL)"
        )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _strip_wrappers(state: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            notes.append(f"removed the {prefix!r} prefix of every key (a wrapped model's state)")
    return state


def _classifier_rows(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the last 2-D weight: every architecture here ends with its linear classifier."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _head_students(path: Path, state: Mapping[str, Tensor]) -> int:
    w = state.get(HEAD + "conv1_1.weight")
    if w is None or w.dim() != 4 or w.shape[1] == 0 or w.shape[0] % w.shape[1]:
        shape = None if w is None else tuple(w.shape)
        raise CheckpointError(
            f"{path}: has trans-fusion keys ({HEAD}*) but {HEAD}conv1_1.weight is {shape}, not the "
            "(C*N, C, 1, 1) convolution of a leader's head; the file is damaged or not an FFSD "
            "leader"
        )
    return int(w.shape[0] // w.shape[1])


def _wanted_matches(network: str, found: str, path: Path) -> str:
    """The name of the one network a file holds, checked against ``task.network``."""
    if found == "unknown" and network != "auto" and network != "leader":
        return network  # a bare one-network state_dict: the user says which network it is
    if network not in ("auto", found):
        what = "a student without the trans-fusion head" if found == "unknown" else f"the {found}"
        raise CheckpointError(
            f"{path} holds one network, {what}, but task.network={network}; use "
            "task.network=auto for this file, or pass a run state (checkpoints/last.pt) to "
            "choose among a run's networks"
        )
    return found


def _run_state_networks(path: Path, blob: dict[str, Any]) -> tuple[dict[str, str], str]:
    """(network name -> key prefix in ``method.modules``, deploy network) of a run state.

    Run states list their networks (``OnlineMethod.networks``); earlier FFSD run states did
    not, and hold FFSD's layout under ``nets``.
    """
    method = blob.get("method")
    if not isinstance(method, Mapping) or not isinstance(method.get("modules"), Mapping):
        raise CheckpointError(f"{path} is an ffsd run state without method.modules; it is damaged")
    listed = method.get("networks")
    if isinstance(listed, Mapping) and listed:
        deploy = str(method.get("deploy") or next(iter(listed)))
        return {str(k): str(v) for k, v in listed.items()}, deploy
    nets = method["modules"].get("nets")
    if not isinstance(nets, Mapping):
        raise CheckpointError(
            f"{path} is an ffsd run state that neither lists its networks nor holds FFSD's "
            "method.modules.nets; it is damaged"
        )
    students = sorted({int(m.group(1)) for k in nets if (m := re.match(r"students\.(\d+)\.", k))})
    found = {"leader": "nets.leader."} | {f"student{i}": f"nets.students.{i}." for i in students}
    return found, "leader"


def _from_run_state(path: Path, blob: dict[str, Any], network: str) -> NetworkCheckpoint:
    networks, deploy = _run_state_networks(path, blob)
    choice = deploy if network == "auto" else network
    if choice not in networks:
        raise CheckpointError(
            f"{path} has no network {choice!r} (task.network={network}); it holds: "
            f"{', '.join(networks)} (the deployed one: {deploy})"
        )
    module, _, prefix = networks[choice].partition(".")
    weights = blob["method"]["modules"].get(module)
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path} lists network {choice!r} in module {module!r}, not saved")
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(
            f"{path} lists network {choice!r} under {networks[choice]!r} but holds no weights "
            "there; the file is damaged"
        )
    fingerprint = blob.get("fingerprint") or {}
    leader = any(k.startswith(HEAD) for k in state)
    students = [n for n in networks if n.startswith("student")]
    return NetworkCheckpoint(
        path=path,
        kind="run-state",
        network=choice,
        leader=leader,
        num_students=_head_students(path, state) if leader else len(students) or None,
        num_classes=_classifier_rows(state),
        epoch=blob.get("epoch"),
        recorded_model=fingerprint.get("model"),
        state=state,
        run_networks=tuple(networks),
    )


def read_network_checkpoint(path: str | Path, network: str = "auto") -> NetworkCheckpoint:
    """Read one network's weights from ``path`` (any kind above) and infer what it can.

    ``network``: ``auto`` (a run state's leader, or the one network a file holds), ``leader`` or
    ``student<i>`` (a run state's student i; for a one-network file, checked against it).
    """
    path = Path(path)
    check_network_choice(network, "task.network")
    if network == "all":
        raise ConfigError(
            "task.network='all' evaluates every network of a run state "
            f"(<run>/checkpoints/last.pt) with task=eval; {path} is read one network at a time "
            "here: use task.network=auto or a network it holds"
        )
    blob = safe_load(path)
    notes: list[str] = []
    if isinstance(blob, Mapping) and blob.get("format") == STATE_FORMAT:
        return _from_run_state(path, dict(blob), network)
    if isinstance(blob, Mapping) and "weight" in blob:
        if not _is_state_dict(blob["weight"]):
            raise CheckpointError(
                f"{path} has a 'weight' entry that is not a state_dict of tensors "
                f"({type(blob['weight']).__name__}); the file is damaged or not a checkpoint"
            )
        kind, state = "release", dict(blob["weight"])
        index = str(blob.get("index")) if blob.get("index") is not None else None
        epoch = blob.get("epoch") if isinstance(blob.get("epoch"), int) else None
        recorded = blob.get("cfg") if isinstance(blob.get("cfg"), str) else None
    elif _is_state_dict(blob):
        kind, state, index, epoch, recorded = "state_dict", dict(blob), None, None, None
    else:
        what = (
            f"a {type(blob).__name__} with keys {sorted(map(str, blob))[:8]}"
            if isinstance(blob, Mapping)
            else f"a {type(blob).__name__}"
        )
        raise CheckpointError(
            f"{path} holds {what}, not network weights. Expected a release-format file "
            "{'weight': state_dict, 'epoch', 'cfg', 'index'} (model<index>_best.pth, this "
            "project's checkpoints/model_leader_best.pth), a run state checkpoints/last.pt, "
            "or a bare state_dict"
        )
    state = _strip_wrappers(state, notes)
    if index == "fusion" or {"fc2.weight", "conv1_1.weight"} <= state.keys():
        raise CheckpointError(
            f"{path} holds the fusion module (index 'fusion'), which classifies the students' "
            "features and cannot run alone; evaluate modelleader_best.pth or model<i>_best.pth"
        )
    leader = any(k.startswith(HEAD) for k in state)
    if leader:
        found = "leader"
    elif index is not None and index.isdigit():
        found = f"student{index}"
    elif index is not None and NAMED_INDEX.match(index):
        found = index
    elif index == "leader":
        # A leader without FFSD's trans-fusion head is a plain backbone: OKDDip's group leader.
        found = "leader"
        notes.append("index 'leader' without a trans-fusion head: a plain network (OKDDip's)")
    else:
        found = "unknown"
    return NetworkCheckpoint(
        path=path,
        kind=kind,
        network=_wanted_matches(network, found, path),
        leader=leader,
        num_students=_head_students(path, state) if leader else None,
        num_classes=_classifier_rows(state),
        epoch=epoch,
        recorded_model=recorded,
        state=state,
        notes=notes,
    )


# -- fitting the weights into a network ------------------------------------------------------


def _shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@cache
def _model_nodes() -> dict[str, Any]:
    return {
        name: OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml").net
        for name in group_options("model")
    }


def identify_architecture(ckpt: NetworkCheckpoint) -> str | None:
    """The ``conf/model`` option whose network has exactly these keys and shapes, if any.

    Networks are built on the meta device (no memory, no initialization cost).
    """
    want = _shapes(ckpt.state)
    kwargs = {
        "num_classes": ckpt.num_classes or 2,
        "leader": ckpt.leader,
        "num_students": ckpt.num_students or 2,
    }
    for name, node in _model_nodes().items():
        try:
            with torch.device("meta"):
                net = instantiate(node, **kwargs)
        except Exception:  # an architecture that cannot take these arguments is not a match
            continue
        if _shapes(net.state_dict()) == want:
            return name
    return None


def mismatch_report(
    got: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> tuple[list[str], int]:
    """Lines listing the first missing/unexpected keys and shape mismatches, and their count."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    lines = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f", first {SHOW}" if len(items) > SHOW else ""
            lines.append(f"  {label} ({len(items)}{more}): {'; '.join(items[:SHOW])}")
    return lines, len(missing) + len(unexpected) + len(shapes)


def _classes_hint(have: int, want: int, dataset: str) -> str:
    fits = []
    for name in group_options("dataset"):
        node = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
        if node.get("num_classes") == have:
            fits.append(name)
    return (
        f"  the file's classifier has {have} classes but dataset={dataset} has {want}; evaluate "
        f"it on the dataset it was trained on (datasets with {have} classes: "
        f"{', '.join(fits) if fits else 'none in conf/dataset'}; or set dataset.num_classes)"
    )


def build_network(
    ckpt: NetworkCheckpoint,
    net_factory: Callable[..., TapNet],
    *,
    model_name: str,
    num_classes: int,
    dataset_name: str,
) -> TapNet:
    """The network of ``ckpt`` without the trans-fusion head, weights loaded, in eval mode.

    The weights are first loaded strictly into the architecture the file implies (a leader with
    its head for ``num_students`` students, or a student), which checks every key and shape;
    the head (needed for training only) is then left out by loading everything else into a
    student-architecture copy, so the returned network has no unused parameters.
    """
    full = net_factory(
        num_classes=num_classes, leader=ckpt.leader, num_students=ckpt.num_students or 2
    )
    expected = full.state_dict()
    lines, count = mismatch_report(ckpt.state, expected)
    if count:
        what = (
            f"a {'leader' if ckpt.leader else 'student'}"
            + (f" for {ckpt.num_students} students" if ckpt.leader else "")
            + f" with {num_classes} classes"
        )
        hints = []
        if ckpt.num_classes is not None and ckpt.num_classes != num_classes:
            hints.append(_classes_hint(ckpt.num_classes, num_classes, dataset_name))
        arch = identify_architecture(ckpt)
        if arch is not None and arch != model_name:
            hints.append(f"  this looks like a {arch} checkpoint: try model={arch}")
        elif ckpt.recorded_model:
            ours = RELEASE_MODEL_NAMES.get(ckpt.recorded_model, ckpt.recorded_model)
            if ours != model_name:
                hints.append(f"  the file records model {ckpt.recorded_model!r}: try model={ours}")
        raise CheckpointError(
            f"{ckpt.path} does not fit model={model_name} ({what}, dataset={dataset_name}):\n"
            + "\n".join(lines + hints)
        )
    full.load_state_dict(ckpt.state)
    if not ckpt.leader:
        return full.eval()
    net = net_factory(num_classes=num_classes, leader=False, num_students=ckpt.num_students)
    net.load_state_dict({k: v for k, v in ckpt.state.items() if not k.startswith(HEAD)})
    return net.eval()


def has_head(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` belongs to a trans-fusion head."""
    return any("trans_fusion" in k for k in module.state_dict())
