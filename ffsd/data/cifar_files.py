"""The CIFAR python files, read without trusting them: official checksums and a pickle reader that
can build nothing but data.

The official archives hold Python pickles. ``pickle.load`` (what torchvision's CIFAR classes
call) runs whatever code a file names, so a ``train`` file planted under ``dataset.root`` would
run at start-up. :class:`BatchUnpickler` resolves only the few numpy globals that a batch's arrays
need (``_reconstruct``, ``ndarray``, ``dtype``, ``_frombuffer``, and ``_codecs.encode`` for
bytes); any other global, ``os.system`` or ``builtins.eval`` alike, stops the read by name before
anything from the file runs. What comes out is then checked: a dict, ``data`` an N x 3072 uint8
array, N labels that are integers below the class count, a list of class names in the meta file.

With ``dataset.verify_checksums: true`` (the default) each file is first compared with the MD5
that torchvision lists for the official archive's files, so a file that is not the official one
is refused before it is parsed; ``false`` is for custom or regenerated files (the reader above
still applies).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torchvision

from ffsd.data.base import DataIntegrityError


def _official(cls: Any) -> dict[str, str]:
    return {name: md5 for name, md5 in [*cls.train_list, *cls.test_list]} | {
        cls.meta["filename"]: cls.meta["md5"]
    }


#: ``{dataset: {file name: MD5}}`` of the official files (torchvision's lists).
OFFICIAL_MD5: dict[str, dict[str, str]] = {
    "cifar10": _official(torchvision.datasets.CIFAR10),
    "cifar100": _official(torchvision.datasets.CIFAR100),
}


def _numpy_core(name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; the official files, pickled by numpy 1, name the old.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    out: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        out[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    import _codecs

    out[("_codecs", "encode")] = _codecs.encode  # bytes in protocol-2 pickles written by Python 3
    return out


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global outside the allow-list; nothing of it was run."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build dicts, lists, strings, numbers and numpy arrays, nothing else."""

    ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, dataset: str) -> None:
    """Refuse ``path`` unless its MD5 is the official file's (``dataset``: cifar10, cifar100)."""
    want = OFFICIAL_MD5[dataset][path.name]
    got = md5(path)
    if got != want:
        raise DataIntegrityError(
            f"{path} is not the official {dataset} file {path.name!r}: its MD5 is {got}, the "
            f"official file's is {want}, so it was not read. Replace it with the official file "
            "(dataset.download=true fetches the archive), or, for custom or regenerated files, "
            "set dataset.verify_checksums=false (each file is then still read by the safe "
            "reader, which runs no code)."
        )


def load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`BatchUnpickler` (latin-1 strings, as Python 2 wrote them)."""
    try:
        with open(path, "rb") as f:
            return BatchUnpickler(f, encoding="latin1").load()
    except RefusedGlobal as err:
        raise DataIntegrityError(
            f"{path} is not a CIFAR file ffsd will read: it asks to call {err.qualname}, which "
            "the CIFAR format never holds (a pickle that runs code). Nothing of it was run. "
            "Replace it with the official file (dataset.download=true)."
        ) from None
    except Exception as err:  # truncated, not a pickle, ...
        raise DataIntegrityError(
            f"{path} is not a readable CIFAR file ({type(err).__name__}: {err}); replace it with "
            "the official file (dataset.download=true)"
        ) from err


def _refuse(path: Path, what: str) -> DataIntegrityError:
    return DataIntegrityError(f"{path} is not a CIFAR batch: {what}")


def read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """``(images N x 3072 uint8, labels)`` of one batch file, checked."""
    entry = load(path)
    if not isinstance(entry, dict):
        raise _refuse(path, f"it holds a {type(entry).__name__}, not a dict")
    data, labels = entry.get("data"), entry.get(labels_key)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        shape = getattr(data, "shape", None)
        raise _refuse(
            path,
            f"'data' must be an N x 3072 uint8 array, it is {type(data).__name__} {shape} "
            f"{getattr(data, 'dtype', '')}",
        )
    if not isinstance(labels, list) or not all(
        isinstance(y, int) and not isinstance(y, bool) and 0 <= y < num_classes for y in labels
    ):
        raise _refuse(path, f"{labels_key!r} must be a list of integers in [0, {num_classes})")
    if len(labels) != len(data):
        raise _refuse(path, f"it holds {len(data)} images but {len(labels)} labels")
    return data, labels


def read_names(path: Path, key: str, num_classes: int) -> list[str]:
    """The class names of a meta file (``label_names`` or ``fine_label_names``), checked."""
    meta = load(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not (
        isinstance(names, list)
        and len(names) == num_classes
        and all(isinstance(n, str) for n in names)
    ):
        raise DataIntegrityError(
            f"{path} is not a CIFAR meta file: {key!r} must list {num_classes} class names"
        )
    return names
