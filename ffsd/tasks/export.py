"""``task=export``: one network of a checkpoint (the leader by default) to deployable files.

The exported network is the checkpoint's network *without* the leader's trans-fusion head: the
weights are loaded into a student-architecture copy (:func:`ffsd.tasks.weights.build_network`), so
the files hold no parameter inference never uses. It maps a float32 NCHW batch of normalized images
(the dataset's ``mean``/``std``) to logits, with a dynamic batch dimension.


Formats (``conf/task/export.yaml``, each an :class:`Exporter` built from its ``_target_``):

* ``torchscript``: ``torch.jit.trace`` -> ``<model>_<network>.torchscript.pt``
  (``torch.jit.load``, also from C++ libtorch). TorchScript is deprecated upstream in favour of
  ``torch.export``, and its deprecation warnings are silenced here;
* ``exported_program``: ``torch.export`` -> ``<model>_<network>.pt2`` (``torch.export.load``);
* ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter, which needs onnxscript)
  -> ``<model>_<network>.onnx``, checked with onnxruntime. onnx, onnxruntime and onnxscript are
  the optional extra ``pip install -e ".[onnx]"``.

The default formats are the first two, which the base install writes; ONNX only when asked for.

Every file is loaded back and run on a check batch (and on its first image alone, which
exercises the dynamic batch axis); the largest absolute difference from the eager network's
logits is printed and written to ``export.json``, and every logit must agree within
``task.atol + task.rtol * |eager logit|`` (``torch.allclose``: the relative part matters only for
networks with very large logits, where float32 itself is that far from exact).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ffsd.config import ConfigError
from ffsd.data.build import build_data
from ffsd.models.base import LogitsOnly, count_parameters
from ffsd.tasks.checkpoint_config import apply_checkpoint_settings
from ffsd.tasks.validation import validate
from ffsd.tasks.weights import (
    build_network,
    check_network_choice,
    has_head,
    read_network_checkpoint,
    require_checkpoint,
)
from ffsd.training.runtime import set_threads

log = logging.getLogger("ffsd")

Runner = Callable[[Tensor], Tensor]


class ExportError(RuntimeError):
    """An export cannot run (missing optional dependency) or does not reproduce the network."""


def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch")}


class Exporter(ABC):
    """Writes a network to one file format and loads it back as a callable for the check."""

    #: File name suffix, with the dot.
    suffix: str
    #: Modules the format needs beyond torch, and how to install them.
    requires: tuple[str, ...] = ()
    install_hint: str = ""

    def check_available(self) -> None:
        """Raise :class:`ExportError` (before any work) if a required module is missing."""
        missing = []
        for name in self.requires:
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
        if missing:
            raise ExportError(
                f"{type(self).__name__} export needs {', '.join(missing)}, missing here. "
                f"{self.install_hint}"
            )

    @abstractmethod
    def save(self, model: nn.Module, example: Tensor, path: Path) -> None:
        """Write ``model`` (eval mode, CPU, float32) traced/exported on ``example`` to ``path``."""

    @abstractmethod
    def load(self, path: Path) -> Runner:
        """A function running the file on a CPU float32 batch and returning CPU logits."""


@contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    # torch.jit warns on every call that it is deprecated; the module docstring says so once.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning
        )
        yield


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    # The ONNX optimizer logs every pass at INFO, and Hydra's job logging shows INFO.
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class TorchScript(Exporter):
    """``torch.jit.trace`` (every architecture here is a static graph, so tracing is exact)."""

    suffix = ".torchscript.pt"

    def save(self, model: nn.Module, example: Tensor, path: Path) -> None:
        with _no_jit_deprecation():
            # check_trace re-traces to compare; the task's own check against eager covers it.
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path))

    def load(self, path: Path) -> Runner:
        with _no_jit_deprecation():
            return torch.jit.load(str(path), map_location="cpu").eval()


class ExportedProgram(Exporter):
    """``torch.export`` with a dynamic batch dimension; saved with ``torch.export.save``."""

    suffix = ".pt2"

    def save(self, model: nn.Module, example: Tensor, path: Path) -> None:
        program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
        torch.export.save(program, str(path))

    def load(self, path: Path) -> Runner:
        return torch.export.load(str(path)).module()


class ONNX(Exporter):
    """``torch.onnx.export`` (``dynamo=True``), one self-contained file, run with onnxruntime.

    Args:
        opset: the ONNX opset to target; ``None`` takes the exporter's default.
    """

    suffix = ".onnx"
    #: The optional extra ``onnx`` (pyproject.toml).
    requires = ("onnx", "onnxruntime", "onnxscript")
    install_hint = (
        'Install the optional extra: pip install -e ".[onnx]" (or pip install onnx onnxruntime '
        "onnxscript), or export without ONNX: task.formats=[torchscript]"
    )

    def __init__(self, opset: int | None = None) -> None:
        self.opset = opset

    def save(self, model: nn.Module, example: Tensor, path: Path) -> None:
        with _quiet_loggers("onnxscript", "onnx_ir"):
            self._export(model, example, path)

    def _export(self, model: nn.Module, example: Tensor, path: Path) -> None:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            opset_version=self.opset,
            dynamo=True,
            dynamic_shapes=(_batch_dim(),),
            # One file: the largest network here (WRN-28-10, ~146 MB) is far below ONNX's 2 GB.
            external_data=False,
            verbose=False,
        )

    def load(self, path: Path) -> Runner:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        return run


def onnx_initializers(path: Path) -> list[str]:
    """Names of the weights stored in an ONNX file (to check what was exported)."""
    import onnx

    return [t.name for t in onnx.load(str(path)).graph.initializer]


@torch.no_grad()
def check_export(
    runner: Runner, model: nn.Module, batches: Sequence[Tensor], *, atol: float, rtol: float
) -> dict[str, Any]:
    """Run the export and the eager ``model`` on ``batches``: the largest absolute difference,
    the largest eager logit, and whether every logit is within ``atol + rtol * |eager|``."""
    diff, scale, ok = 0.0, 0.0, True
    for x in batches:
        got, want = runner(x).float(), model(x).float()
        if got.shape != want.shape:
            raise ExportError(f"exported output shape {tuple(got.shape)} != {tuple(want.shape)}")
        diff = max(diff, (got - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
        ok = ok and torch.allclose(got, want, rtol=rtol, atol=atol)
    return {"max_abs_diff": diff, "max_abs_logit": scale, "within_tolerance": ok}


def export_network(
    model: nn.Module,
    example: Tensor,
    *,
    exporters: Mapping[str, Exporter],
    formats: Sequence[str],
    out_dir: Path,
    stem: str,
    atol: float,
    rtol: float,
) -> dict[str, dict[str, Any]]:
    """Write ``model`` in each format and check it; one record per format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batches = [example, example[:1]]
    records: dict[str, dict[str, Any]] = {}
    for name in formats:
        exporter = exporters[name]
        path = out_dir / f"{stem}{exporter.suffix}"
        log.info("exporting %s to %s", name, path)
        start = time.perf_counter()
        exporter.save(model, example, path)
        seconds = time.perf_counter() - start
        check = check_export(exporter.load(path), model, batches, atol=atol, rtol=rtol)
        records[name] = {
            "path": str(path),
            "bytes": path.stat().st_size,
            "export_s": seconds,
            "checked_batch_sizes": [int(b.shape[0]) for b in batches],
            **check,
        }
    return records


def format_export(records: Mapping[str, dict[str, Any]], atol: float, rtol: float) -> str:
    head = ["format", "file", "MB", "max |diff|", "max |logit|", f"ok ({atol:g} + {rtol:g}|logit|)"]
    rows = [
        [
            name,
            r["path"],
            f"{r['bytes'] / 1e6:.2f}",
            f"{r['max_abs_diff']:.3g}",
            f"{r['max_abs_logit']:.3g}",
            "yes" if r["within_tolerance"] else "NO",
        ]
        for name, r in records.items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), "  ".join("-" * w for w in widths), *(fmt.format(*r) for r in rows)]
    )


def _check_options(
    formats: Sequence[str],
    exporters: Mapping[str, Exporter],
    batch_size: Any,
    check_inputs: Any,
    atol: Any,
    rtol: Any,
) -> None:
    errors = []
    choices = ", ".join(exporters)
    if not formats or any(f not in exporters for f in formats):
        errors.append(f"task.formats={list(formats)!r} is not valid; choose from: {choices}")
    if not isinstance(batch_size, int) or batch_size < 2:
        errors.append(
            f"task.batch_size={batch_size!r} must be an integer >= 2 (a batch of 1 would fix "
            "the batch dimension of the exported graph)"
        )
    if check_inputs not in ("random", "test"):
        errors.append(
            f"task.check_inputs={check_inputs!r} is not valid; choose one of: random, test"
        )
    for key, value in (("atol", atol), ("rtol", rtol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            errors.append(f"task.{key}={value!r} must be a number >= 0")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def run(
    cfg: DictConfig,
    *,
    network: str,
    formats: Sequence[str],
    exporters: Mapping[str, Exporter],
    output_dir: str,
    batch_size: int,
    check_inputs: str,
    atol: float,
    rtol: float,
    infer_datasets: Sequence[str] = (),
) -> float:
    """``task=export`` (conf/task/export.yaml): export one network of ``cfg.checkpoint``.

    The model and dataset the command line does not choose come from the checkpoint
    (:mod:`ffsd.tasks.checkpoint_config`). Returns the largest difference from the eager
    network over all formats.
    """
    path = require_checkpoint(cfg, "export")
    check_network_choice(network, "task.network")
    formats = list(formats)
    _check_options(formats, exporters, batch_size, check_inputs, atol, rtol)
    for name in formats:
        exporters[name].check_available()
    known = apply_checkpoint_settings(cfg, path, network, list(infer_datasets))
    validate(cfg)
    set_threads(cfg.trainer.threads)
    data = build_data(cfg) if check_inputs == "test" else None
    ckpt = known or read_network_checkpoint(path, network)
    log.info(ckpt.describe())
    num_classes, size = int(cfg.dataset.num_classes), int(cfg.dataset.image_size)
    net = build_network(
        ckpt,
        instantiate(cfg.model.net, _partial_=True),
        model_name=str(cfg.model.name),
        num_classes=num_classes,
        dataset_name=str(cfg.dataset.name),
    )
    # Exports are made on the CPU in float32: the files then run anywhere.
    model = LogitsOnly(net).eval()
    if data is not None:
        example = next(iter(data.test_loader(batch_size)))[0][:batch_size].float()
        if example.shape[0] < 2:
            raise ConfigError(f"the {cfg.dataset.name} test split has fewer than 2 images")
    else:
        gen = torch.Generator().manual_seed(int(cfg.trainer.seed))
        example = torch.randn(batch_size, 3, size, size, generator=gen)
    out_dir = Path(str(output_dir))
    stem = f"{cfg.model.name}_{ckpt.network if ckpt.network != 'unknown' else 'student'}"
    records = export_network(
        model,
        example,
        exporters=exporters,
        formats=formats,
        out_dir=out_dir,
        stem=stem,
        atol=atol,
        rtol=rtol,
    )
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    report = {
        "checkpoint": str(path),
        "model": str(cfg.model.name),
        "network": ckpt.network,
        "inferred": ckpt.inferred(),
        "trans_fusion_head": has_head(model),
        "parameters": count_parameters(model),
        "input": {
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "normalize": {"mean": dataset.get("mean"), "std": dataset.get("std")},
        },
        "output": {"shape": ["batch", num_classes], "meaning": "logits"},
        "check": {"inputs": check_inputs, "atol": atol, "rtol": rtol},
        "formats": records,
    }
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    print(
        f"{ckpt.network} of {path} ({cfg.model.name}, {count_parameters(model):,} parameters, "
        f"no trans-fusion head) -> {out_dir}\n" + format_export(records, atol, rtol)
    )
    worst = max(r["max_abs_diff"] for r in records.values())
    failed = [n for n, r in records.items() if not r["within_tolerance"]]
    if failed:
        raise ExportError(
            f"{', '.join(failed)} export differs from the eager network by up to {worst:.3g}, "
            f"beyond task.atol={atol:g} + task.rtol={rtol:g} * |logit| "
            f"(see {out_dir / 'export.json'})"
        )
    return worst
