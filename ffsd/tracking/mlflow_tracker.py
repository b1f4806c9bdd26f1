"""MLflow tracking (``logger=mlflow``): one MLflow run per job, one experiment per sweep.

Where runs go (``conf/logger/mlflow.yaml``): ``logger.tracking_uri`` (by default the
``MLFLOW_TRACKING_URI`` environment variable), else an SQLite file at ``logger.store`` relative to
the directory the job was launched from (``hydra.runtime.cwd``), ``outputs/mlflow.db``; runs in
such a store keep their artifacts in ``mlartifacts/`` beside the file. A relative ``sqlite:///``
URI is also taken relative to the launch directory, so a job that changes directory or runs on
another node of a shared file system writes to the same store. A store file that does not exist
yet is created whole by one job while the others wait (:mod:`~ffsd.tracking.sqlite_store`).

Names: the experiment is ``logger.experiment_name``, else ``ffsd/<preset or model-dataset>``,
with a sweep's directory after it for the jobs of a sweep (:func:`default_experiment_name`): one
experiment per sweep, apart from single runs. Experiments are created tagged as holding training
runs (:data:`EXPERIMENT_KIND`). A sweep's job is named by its swept values, a single run by its
setting, overrides and a time stamp with random digits (:func:`default_run_name`).

A run holds:

* params: the whole composed config, flattened to dotted keys (``distill.lambda_fusion``), less
  its per-run paths (:func:`run_path_keys`). A value longer than MLflow accepts is logged as a
  pointer to the ``config/params_overflow.yaml`` artifact, which holds it whole; nothing is cut.
* tags: the per-run paths under their config keys (``trainer.output_dir``), ``ffsd.sweep_dir``
  (absolute), ``ffsd.job_num``, ``ffsd.overrides`` (the job's Hydra overrides, a JSON list),
  ``ffsd.choices`` (each group's option), ``ffsd.task``, ``ffsd.git_commit`` (and MLflow's
  ``mlflow.source.git.commit``), ``ffsd.git_dirty``, ``ffsd.hostname``, ``ffsd.slurm_job_id``
  (and ``ffsd.slurm_array``), ``ffsd.world_size``, ``ffsd.run_dir``, ``ffsd.launch_dir``,
  ``ffsd.preset``; a resumed run adds ``ffsd.resume_count`` and ``ffsd.resume.<n>`` (host,
  SLURM job and commit of each resume); a run started with a ``parent`` (an evaluation of a
  tracked run's checkpoint) is created in the parent's store and experiment with
  ``mlflow.parentRunId``.
* metrics: the engine's record of every epoch with ``step=epoch``, then the summary
  (``best/<net>/top<k>``, ``best_epoch/<net>/top<k>``, ``final/<net>/top<k>``).
* artifacts: ``config/`` (config.yaml, overrides.yaml, hydra.yaml), ``environment/pip_freeze.txt``,
  ``logs/`` (Hydra's job log), ``results/`` (metrics.jsonl, summary.json) and
  ``checkpoints/model_<deploy>_best.pth`` (FFSD: ``model_leader_best.pth``).

Resuming: the engine passes the run id saved in ``checkpoints/last.pt``; the same run is
reopened, never a new one, and any epoch in ``metrics.jsonl`` that the store lacks is sent.

Failures: an unreachable store stops the job in :meth:`MLflowTracker.start`, before the first
epoch, with the URI and the ways out (:class:`~ffsd.tracking.base.TrackingError`). After that,
tracking never stops nor slows training: every record after ``start`` goes through a
:class:`~ffsd.tracking.sender.Sender`, whose thread sends them in order and retries a failing one
until the store takes it. ``finish`` waits at most ``logger.flush_timeout_s`` for that queue;
what is still unsent is in ``metrics.jsonl``/``summary.json``/``checkpoints/``, is named in a
warning, and is sent when the job is relaunched (it resumes, trains nothing more, re-sends every
epoch the store lacks, the summary, the artifacts and the run's status).

One HTTP call must not hold the sender for minutes either: unless already set in the
environment, :data:`HTTP_SETTINGS` replaces MLflow's defaults (7 retries with exponential
backoff, 120 s per answer) for this process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ffsd.config import ConfigError
from ffsd.tracking import provenance
from ffsd.tracking.base import TrackedRun, Tracker, TrackingError
from ffsd.tracking.sender import Record, Sender
from ffsd.tracking.sqlite_store import ensure_sqlite_store

log = logging.getLogger("ffsd")

ON_MISSING_RUN = ("error", "new")
OVERFLOW_ARTIFACT = "config/params_overflow.yaml"
#: In each run directory: the store, experiment and run id the job logged to, as resolved then.
RUN_RECORD = "mlflow_run.json"

#: MLflow's HTTP client settings for this process (unless the environment sets them): one call to
#: a server that is down fails within seconds (2 retries, 0-2.5 s apart) instead of minutes of
#: backoff, and waits at most 30 s for an answer (a hung server, a large upload). The sender
#: retries on its own, for as long as the job lives.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
#: The sender's delay between tries of a failing record: doubling from the first to the last.
RETRY_DELAYS_S = (1.0, 30.0)
#: The tag MLflow 3's UI reads to open an experiment on its training runs rather than on its
#: GenAI (traces) view, which hides them.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# -- where runs go ---------------------------------------------------------------------------
def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (relative as written), else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def resolve_tracking_uri(tracking_uri: str | None, store: str, launch_dir: Path) -> str:
    """``tracking_uri`` if set, else ``sqlite:///<launch_dir>/<store>``; SQLite paths absolute."""
    uri = str(tracking_uri) if tracking_uri else None
    if uri is None:
        path = Path(store).expanduser()
    else:
        path = sqlite_path(uri)
        if path is None:
            return uri
    if not path.is_absolute():
        path = launch_dir / path
    return f"sqlite:///{path.resolve()}"


def artifact_location(uri: str, experiment_name: str) -> str | None:
    """For an SQLite store, ``mlartifacts/<experiment>/`` beside the file; else the server's."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._/-]", "_", experiment_name).strip("/") or "default"
    return (db.parent / "mlartifacts" / safe).as_uri()


def setting_name(cfg: DictConfig, preset: str | None) -> str:
    """What a run trains, in a word: the experiment preset, else ``<model>-<dataset>``."""
    if preset:
        return str(preset)
    model = OmegaConf.select(cfg, "model.name", default="model")
    dataset = OmegaConf.select(cfg, "dataset.name", default="data")
    return f"{model}-{dataset}"


def default_experiment_name(cfg: DictConfig, job: provenance.HydraJob) -> str:
    """``ffsd/<preset or model-dataset>``; a sweep's jobs add its directory, so that each sweep
    is its own experiment (``ffsd/quickstart/multirun/2025-06-01/12-00-00``): the sweep directory
    relative to the launch directory, or absolute when it lies elsewhere."""
    name = f"ffsd/{setting_name(cfg, job.preset)}"
    if job.sweep_dir is None:
        return name
    try:
        where = job.sweep_dir.relative_to(job.launch_dir.resolve()).as_posix()
    except ValueError:
        where = job.sweep_dir.as_posix().lstrip("/")
    return f"{name}/{where}"


def _short(override: str) -> str:
    # A path says little in a name and can be long: its last part (checkpoint=last.pt).
    key, sep, value = override.partition("=")
    return f"{key}{sep}{value.rstrip('/').rpartition('/')[2]}" if "/" in value else override


def default_run_name(cfg: DictConfig, job: provenance.HydraJob, skip: set[str]) -> str:
    """A single run's name: ``[task ]<preset or model-dataset>[ overrides] <MMDD-HHMMSS>-<hex>``.

    The overrides are the job's command line less Hydra's keys, the keys in ``skip`` (per-run
    paths) and the groups the first part names. The last four hex digits come from the
    operating system (``secrets``), never from the ``random`` module that runs seed: MLflow's
    own names do, so every run of a seed got the same one.
    """
    base = setting_name(cfg, job.preset)
    named = {"task", *(("experiment",) if job.preset else ("model", "dataset"))}
    kept = [
        _short(o)
        for o in job.overrides
        if not (key := provenance.override_key(o)).startswith("hydra")
        and key not in skip
        and key not in named
    ]
    task = task_name(cfg, job)
    stamp = f"{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    head = f"{task} {base}" if task and task != "train" else base
    middle = ",".join(kept)
    room = MAX_ENTITY_KEY_LENGTH - len(head) - len(stamp) - 2
    if len(middle) > room:
        middle = middle[: max(room - 1, 0)] + "…"
    return " ".join(p for p in (head, middle, stamp) if p)


def task_name(cfg: DictConfig, job: provenance.HydraJob) -> str:
    """``train``, ``eval``, ``export``: the task option, else the task module's name."""
    task = job.choices.get("task") or str(OmegaConf.select(cfg, "task._target_", default=""))
    return task.removesuffix(".run").rpartition(".")[2] if task.endswith(".run") else task


def effective_choices(cfg: DictConfig, job: provenance.HydraJob) -> dict[str, str]:
    """The option of each group, as run: Hydra's choices, with the model and dataset the config
    holds (task=eval may have taken them from a checkpoint; an option's ``name`` is its own)."""
    out = dict(job.choices)
    for group in ("model", "dataset"):
        name = OmegaConf.select(cfg, f"{group}.name", default=None)
        if name is not None:
            out[group] = str(name)
    return out


def _raw_leaves(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf's value as written (interpolations unresolved)."""
    out: dict[str, Any] = {}
    for key in cfg:
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig):
            out |= _raw_leaves(node, f"{name}.")
        else:
            out[name] = node._value()
    return out


def run_path_keys(cfg: DictConfig, flat: dict[str, str], named: Iterable[str]) -> set[str]:
    """The config keys that are per-run paths: ``named`` (``logger.path_keys``), every key whose
    value comes from ``${hydra:runtime...}`` or ``${hydra:job...}``, and every key whose value is
    one of those paths or lies under one (``task.output_dir: ${trainer.output_dir}``)."""
    keys = {k for k in named if k in flat}
    for key, raw in _raw_leaves(cfg).items():
        if isinstance(raw, str) and ("${hydra:runtime" in raw or "${hydra:job" in raw):
            keys.add(key)
    roots = {flat[k].rstrip("/") for k in keys if flat[k] not in ("", "null")}
    for key, value in flat.items():
        if value.rstrip("/") in roots or any(value.startswith(r + "/") for r in roots):
            keys.add(key)
    return keys


def read_run_record(run_dir: Path) -> TrackedRun | None:
    """The run a run directory's :data:`RUN_RECORD` names, if it has a readable one."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text())
        return TrackedRun(record["tracking_uri"], record["experiment"], str(record["run_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unreachable(uri: str, reason: object, what: str = "is not reachable") -> TrackingError:
    return TrackingError(
        f"MLflow tracking store {uri} {what}: {reason}\n"
        "Nothing was trained. Start the tracking server (README, 'Results and tracking'), point "
        "logger.tracking_uri (or MLFLOW_TRACKING_URI) at a reachable one, leave both unset to "
        "use the local SQLite store outputs/mlflow.db, or turn tracking off with logger=none."
    )


def bound_http_calls(uri: str) -> None:
    """Apply :data:`HTTP_SETTINGS` for a server URI, keeping any value the environment sets."""
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)


def refused(err: Exception) -> bool:
    """The store answered no (HTTP 4xx but a timeout or rate limit): trying again cannot help."""
    if not isinstance(err, MlflowException):
        return False
    code = err.get_http_status_code()
    return 400 <= code < 500 and code not in (408, 429)


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, without MLflow's minutes of retries, when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return  # something answered; MLflow's own calls report what is wrong
        except (urllib.error.URLError, OSError) as err:
            raise unreachable(uri, getattr(err, "reason", err)) from err
        return
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise unreachable(uri, err) from err


def write_whole(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` as the engine replaces its files: a temporary file beside it
    (the user's umask), fsync, rename, so that a reader or a killed job never sees half of it.

    ``ffsd.training.checkpoint.atomic_write_text`` does the same; tracking may not import the
    training layer.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def get_or_create_experiment(
    client: MlflowClient, name: str, location: str | None, attempts: int = 5
) -> str:
    """The id of experiment ``name``, created if needed; tolerates a concurrent creation."""
    for attempt in range(attempts):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise TrackingError(
                    f"MLflow experiment {name!r} is deleted in {client.tracking_uri}: restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose "
                    "another logger.experiment_name"
                )
            return exp.experiment_id
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            time.sleep(0.1 * (attempt + 1))  # another job created it: read it back
            continue
        client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
        return exp_id
    raise TrackingError(f"could not create or read MLflow experiment {name!r}")


# -- params ----------------------------------------------------------------------------------
def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def flatten_config(cfg: DictConfig, prefix: str = "") -> dict[str, str]:
    """Every leaf of ``cfg`` as ``{"a.b.c": value}``, resolved where possible.

    A value that cannot be resolved here (``${hydra:...}`` outside a Hydra app) is kept as
    written. Lists are one value each (JSON); strings are kept as they are.
    """
    out: dict[str, str] = {}
    for key in cfg:
        name = f"{prefix}{key}"
        try:
            value = cfg[key]
        except OmegaConfBaseException:
            out[name] = str(cfg._get_node(key)._value())
            continue
        if isinstance(value, DictConfig):
            out |= flatten_config(value, prefix=f"{name}.")
        elif isinstance(value, ListConfig):
            try:
                out[name] = json.dumps(OmegaConf.to_container(value, resolve=True))
            except OmegaConfBaseException:
                out[name] = json.dumps(OmegaConf.to_container(value, resolve=False))
        else:
            out[name] = _param_value(value.name if isinstance(value, Enum) else value)
    return out


def split_params(flat: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(params MLflow accepts, overflow)``: a too-long value becomes a pointer to the overflow
    artifact; a too-long key lives only there. Together they hold every value whole."""
    params: dict[str, str] = {}
    overflow: dict[str, str] = {}
    for key, value in flat.items():
        if len(key) > MAX_ENTITY_KEY_LENGTH:
            overflow[key] = value
        elif len(value) > MAX_PARAM_VAL_LENGTH:
            overflow[key] = value
            params[key] = f"<{len(value)} characters: see artifact {OVERFLOW_ARTIFACT}>"
        else:
            params[key] = value
    return params, overflow


def _fit_tag(value: str, artifact: str) -> str:
    if len(value) <= MAX_TAG_VAL_LENGTH:
        return value
    return f"<{len(value)} characters: see artifact {artifact}>"


def _is_seconds(value: Any, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def _spans(steps: Iterable[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for step in sorted(set(steps)):
        if runs and runs[-1][1] == step - 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe_records(records: list[Record]) -> str:
    """What ``records`` hold, for a person: ``metrics of epochs 2-6, 3 artifacts (...), ...``."""
    parts: list[str] = []
    epochs = [r.step for r in records if r.kind == "metrics" and r.step is not None]
    if epochs:
        parts.append(f"the metrics of epoch{'s' if len(set(epochs)) > 1 else ''} {_spans(epochs)}")
    parts += [r.what for r in records if r.kind == "summary"]
    artifacts = [r.what.removeprefix("artifact ") for r in records if r.kind == "artifact"]
    if artifacts:
        names = ", ".join(Path(a).name for a in artifacts)
        parts.append(f"{len(artifacts)} artifact{'s' if len(artifacts) > 1 else ''} ({names})")
    parts += [r.what for r in records if r.kind not in ("metrics", "summary", "artifact")]
    return ", ".join(parts)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- the tracker -----------------------------------------------------------------------------
class MLflowTracker(Tracker):
    """Logs one job to one MLflow run (see the module docstring for what and where)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        store: str = "outputs/mlflow.db",
        experiment_name: str | None = None,
        run_name: str | None = None,
        log_checkpoint: bool = True,
        connect_timeout_s: float = 10.0,
        on_missing_run: str = "error",
        flush_timeout_s: float = 60.0,
        path_keys: Iterable[str] = ("trainer.output_dir",),
    ) -> None:
        if on_missing_run not in ON_MISSING_RUN:
            raise ConfigError(
                f"logger.on_missing_run={on_missing_run!r} is not valid; choose one of: "
                f"{', '.join(ON_MISSING_RUN)}"
            )
        for key, value, least in (
            ("connect_timeout_s", connect_timeout_s, "a positive"),
            ("flush_timeout_s", flush_timeout_s, "a non-negative"),
        ):
            if not _is_seconds(value, positive=least == "a positive"):
                raise ConfigError(f"logger.{key}={value!r} must be {least} number of seconds")
        if experiment_name is not None and not str(experiment_name).strip():
            raise ConfigError(
                f"logger.experiment_name={experiment_name!r} must be a non-empty name or null"
            )
        self.tracking_uri = tracking_uri
        self.store = store
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.log_checkpoint = bool(log_checkpoint)
        self.connect_timeout_s = float(connect_timeout_s)
        self.on_missing_run = on_missing_run
        self.flush_timeout_s = float(flush_timeout_s)
        if isinstance(path_keys, str) or not all(isinstance(k, str) for k in path_keys):
            raise ConfigError(
                f"logger.path_keys={path_keys!r} must be a list of config keys, e.g. "
                "[trainer.output_dir]"
            )
        self.path_keys = tuple(path_keys)
        self.run_id: str | None = None
        self.uri: str | None = None
        self.experiment: str | None = None
        self.client: MlflowClient | None = None
        self.run_dir: Path | None = None
        self.job: provenance.HydraJob | None = None
        self.parent: TrackedRun | None = None
        #: The per-run paths of the config (:func:`run_path_keys`), logged as tags.
        self.paths: dict[str, str] = {}
        self._sender: Sender | None = None

    # -- set-up, in the launching process and in the job ------------------------------------
    def _connect(self, cfg: DictConfig) -> MlflowClient:
        self.job = job = provenance.hydra_job(cfg)
        self.uri = resolve_tracking_uri(self.tracking_uri, self.store, job.launch_dir)
        self.experiment = str(self.experiment_name or default_experiment_name(cfg, job))
        bound_http_calls(self.uri)
        check_reachable(self.uri, self.connect_timeout_s)
        db = sqlite_path(self.uri)
        if db is not None:
            try:
                ensure_sqlite_store(db)
            except Exception as err:  # sqlite3, SQLAlchemy, alembic or the file system
                raise unreachable(self.uri, err, "could not be created") from err
        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client: MlflowClient) -> str:
        assert self.uri is not None and self.experiment is not None
        try:
            return get_or_create_experiment(
                client, self.experiment, artifact_location(self.uri, self.experiment)
            )
        except MlflowException as err:
            raise unreachable(self.uri, err, "cannot provide the experiment") from err

    def prepare(self, cfg: DictConfig) -> None:
        """Create the store and the experiment once, before a sweep's jobs race for them."""
        client = self._connect(cfg)
        key = (self.uri, self.experiment)
        if key in _PREPARED:
            return
        self._experiment_id(client)
        _PREPARED.add(key)
        log.info("MLflow experiment %r ready in %s", self.experiment, self.uri)

    def start(
        self,
        cfg: DictConfig,
        run_dir: Path,
        resume_run_id: str | None = None,
        parent: TrackedRun | None = None,
    ) -> None:
        if parent is not None:  # a child run lives in its parent's store and experiment
            self.tracking_uri, self.experiment_name = parent.uri, parent.experiment
        self.parent = parent
        self.client = client = self._connect(cfg)
        self._sender = Sender(self.uri, *RETRY_DELAYS_S, permanent=refused)
        self.run_dir = Path(run_dir)
        job = self.job
        flat = flatten_config(cfg)
        paths = run_path_keys(cfg, flat, self.path_keys)
        self.paths = {k: flat.pop(k) for k in sorted(paths)}  # tags, not params
        try:
            run = client.get_run(resume_run_id) if resume_run_id else None
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise unreachable(self.uri, err, "failed before training") from err
            if self.on_missing_run == "error":
                raise TrackingError(
                    f"{self.run_dir / 'checkpoints' / 'last.pt'} continues MLflow run "
                    f"{resume_run_id}, which {self.uri} does not have. Point logger.tracking_uri "
                    "at the store the run started in, or set logger.on_missing_run=new to start "
                    "a new run holding every epoch so far (from metrics.jsonl)."
                ) from err
            log.warning("MLflow run %s is not in %s: starting a new run", resume_run_id, self.uri)
            run = None
        try:
            if run is None:
                self._create_run(client, cfg, flat, job)
                resumed = (self.run_dir / "checkpoints" / "last.pt").is_file()
            else:
                self._reopen_run(client, run, cfg, flat)
                resumed = True
            if resumed:
                self._backfill(client)
        except MlflowException as err:
            self._sender.close(0)
            if self.run_id is not None:
                self._terminate("FAILED")
            raise unreachable(self.uri, err, "failed before training") from err
        self._record_location()
        log.info("tracking: %s", self.describe())

    def _record_location(self) -> None:
        # The config's tracking_uri interpolates MLFLOW_TRACKING_URI, which may differ when the
        # report runs later; this file says where this job's run really is.
        assert self.run_dir is not None
        record = {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}
        write_whole(self.run_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")

    def _create_run(
        self, client: MlflowClient, cfg: DictConfig, flat: dict[str, str], job: Any
    ) -> None:
        exp_id = self._experiment_id(client)
        name = self.run_name or ",".join(job.swept_overrides())
        if not name or len(name) > MAX_ENTITY_KEY_LENGTH:
            name = default_run_name(cfg, job, set(self.paths))
        tags = self._run_tags(cfg, job)
        run = client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params, overflow = split_params(flat)
        self._log_params(client, params, overflow)
        self._log_start_artifacts(client, cfg, job, prefix="config")

    def _reopen_run(
        self, client: MlflowClient, run: Any, cfg: DictConfig, flat: dict[str, str]
    ) -> None:
        self.run_id = run.info.run_id
        client.update_run(self.run_id, status="RUNNING")
        n = int(run.data.tags.get("ffsd.resume_count", "0")) + 1
        params, overflow = split_params(flat)
        old = run.data.params
        new = {k: v for k, v in params.items() if k not in old}
        changed = {k: {"was": old[k], "now": v} for k, v in params.items() if old.get(k, v) != v}
        self._log_params(client, new, overflow)
        here = provenance.machine() | {"git_commit": provenance.git_state()[0]}
        tags = {"ffsd.resume_count": str(n), f"ffsd.resume.{n}": json.dumps(here)}
        tags |= {k: _fit_tag(v, "config/config.yaml") for k, v in self.paths.items()}
        if changed:
            # MLflow params cannot change; the new values are kept beside the old ones.
            artifact = f"config/resume_{n}/changed_params.yaml"
            client.log_text(self.run_id, yaml.safe_dump(changed), artifact)
            tags[f"ffsd.resume.{n}.changed_params"] = _fit_tag(", ".join(changed), artifact)
            log.warning(
                "resumed MLflow run %s with %d changed config values (%s); MLflow keeps the "
                "first values as params, the new ones are in artifact %s",
                self.run_id,
                len(changed),
                ", ".join(list(changed)[:5]),
                artifact,
            )
        client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_start_artifacts(client, cfg, self.job, prefix=f"config/resume_{n}")

    def _run_tags(self, cfg: DictConfig, job: Any) -> dict[str, str]:
        commit, dirty = provenance.git_state()
        tags = {
            "ffsd.overrides": _fit_tag(json.dumps(job.overrides), "config/overrides.yaml"),
            "ffsd.git_commit": commit,
            "mlflow.source.git.commit": commit,
            "ffsd.git_dirty": "unknown" if dirty is None else str(dirty).lower(),
            "ffsd.world_size": str(provenance.world_size()),
            "ffsd.run_dir": str(self.run_dir.resolve()),
            "ffsd.launch_dir": str(job.launch_dir),
            "ffsd.task": task_name(cfg, job),
            "ffsd.choices": _fit_tag(json.dumps(effective_choices(cfg, job)), "config/hydra.yaml"),
        }
        # Per-run paths: tags, so that MLflow's compare view shows only settings that differ.
        tags |= {k: _fit_tag(v, "config/config.yaml") for k, v in self.paths.items()}
        if self.parent is not None:  # MLflow nests the run under the one it belongs to
            tags["mlflow.parentRunId"] = self.parent.run_id
        tags |= {f"ffsd.{k}": v for k, v in provenance.machine().items()}
        if job.sweep_dir is not None:
            tags["ffsd.sweep_dir"] = str(job.sweep_dir)
        if job.job_num is not None:
            tags["ffsd.job_num"] = str(job.job_num)
        if job.preset:
            tags["ffsd.preset"] = str(job.preset)
        return tags

    def _log_params(
        self, client: MlflowClient, params: dict[str, str], overflow: dict[str, str]
    ) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=chunk)
        if overflow:
            client.log_text(self.run_id, yaml.safe_dump(overflow), OVERFLOW_ARTIFACT)
            log.info(
                "%d config values too long for MLflow params: %s", len(overflow), OVERFLOW_ARTIFACT
            )

    def _log_start_artifacts(
        self, client: MlflowClient, cfg: DictConfig | None, job: Any, prefix: str
    ) -> None:
        if cfg is not None:
            client.log_text(self.run_id, OmegaConf.to_yaml(cfg), f"{prefix}/config.yaml")
        client.log_text(
            self.run_id, yaml.safe_dump(list(job.overrides)), f"{prefix}/overrides.yaml"
        )
        hydra_yaml = (job.output_dir or self.run_dir) / ".hydra" / "hydra.yaml"
        if hydra_yaml.is_file():
            client.log_artifact(self.run_id, str(hydra_yaml), prefix)
        client.log_text(self.run_id, provenance.pip_freeze(), "environment/pip_freeze.txt")

    def _backfill(self, client: MlflowClient) -> None:
        """Send the epochs of ``metrics.jsonl`` that the run lacks (a resumed job's past)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        logged = {m.step for m in client.get_metric_history(self.run_id, "time/epoch_s")}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        missing = [r for r in records if int(r["epoch"]) not in logged]
        for r in missing:
            metrics = {k: float(v) for k, v in r.items() if k != "epoch"}
            self.log_metrics(metrics, step=int(r["epoch"]))
        if missing:
            log.info("sent %d earlier epochs from %s to MLflow", len(missing), path)

    # -- during the run ---------------------------------------------------------------------
    def _submit(self, record: Record) -> None:
        if self._sender is None:
            raise RuntimeError("MLflowTracker.start must be called before logging")
        self._sender.submit(record)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_metrics(metrics, step, "metrics", f"metrics of step {step}")

    def _log_metrics(self, metrics: dict[str, float], step: int, kind: str, what: str) -> None:
        # Stamped now, not when the sender gets through: the store shows when the epoch ended.
        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
        client, run_id = self.client, self.run_id

        def send() -> None:
            for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=chunk)

        self._submit(Record(what, send, kind=kind, step=int(step)))

    def log_summary(self, metrics: dict[str, float]) -> None:
        self._log_metrics(metrics, 0, "summary", "the summary metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        client, run_id = self.client, self.run_id
        self._submit(
            Record(
                f"artifact {path}",
                lambda: client.log_artifact(run_id, str(path), artifact_path),
                kind="artifact",
            )
        )

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is None or self.run_id is None or self._sender is None:
            return
        run_dir, job = self.run_dir, self.job
        log_file = None
        if job is not None and job.job_name:
            log_file = (job.output_dir or run_dir) / f"{job.job_name}.log"
        best = sorted((run_dir / "checkpoints").glob("model_*_best.pth"))
        for path, dest in (
            (log_file, "logs"),
            (run_dir / "metrics.jsonl", "results"),
            (run_dir / "summary.json", "results"),
            *((p, "checkpoints") for p in (best if self.log_checkpoint else [])),
        ):
            if path is not None and path.is_file():
                self.log_artifact(path, dest)
        client, run_id = self.client, self.run_id
        self._submit(
            Record(
                f"the run's status ({status})",
                lambda: client.set_terminated(run_id, status),
                kind="status",
            )
        )
        unsent = self._sender.close(self.flush_timeout_s)
        if unsent:
            log.warning(
                "MLflow (%s) did not take all of run %s within logger.flush_timeout_s=%g s; "
                "not sent: %s. Nothing is lost: every epoch is in %s, the summary in "
                "summary.json. Once the store answers, relaunch the same command "
                "(trainer.resume=auto, the default): it trains nothing more and sends what is "
                "missing.",
                self.uri,
                self.run_id,
                self.flush_timeout_s,
                describe_records(unsent),
                run_dir / "metrics.jsonl",
            )

    def _terminate(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as err:  # the run's files are complete; only its status is stale
            log.error("could not mark MLflow run %s %s: %s", self.run_id, status, err)

    def describe(self) -> str:
        where = self.uri or "(not started)"
        hint = ""
        db = sqlite_path(where) if self.uri else None
        if db is not None:
            hint = f"; browse with: mlflow ui --backend-store-uri sqlite:///{db}"
        return f"MLflow run {self.run_id} in experiment {self.experiment!r} at {where}{hint}"


#: (tracking URI, experiment) pairs already prepared in this process.
_PREPARED: set[tuple[str | None, str | None]] = set()
