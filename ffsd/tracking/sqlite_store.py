"""The embedded SQLite tracking store (``outputs/mlflow.db``): created whole, one job at a time.

MLflow builds the tables of an empty SQLite store on first use by running its schema migrations.
Jobs started together on a fresh store each run them: the slower ones crash half-way through
(``duplicate column name: step``, ``table _alembic_tmp_tags already exists``), and a crash can
leave a half-migrated store that every later job fails on.

:func:`ensure_sqlite_store` serializes the creation with a file lock beside the store
(``mlflow.db.lock``, an flock: the kernel frees it when its holder dies, however it dies) and
builds the store in a temporary file that is renamed into place once every migration has run. A
store at its path is therefore always complete: jobs that find one open it without the lock (MLflow
then only reads the schema version), jobs that come while it is being built wait for the lock and
find it built, and a job killed while building leaves a temporary file, which the next creator
removes, never a broken store. Upgrading an existing store to a newer MLflow stays an explicit
``mlflow db upgrade`` (MLflow refuses an out-of-date schema with that advice), not something a job
does behind its neighbours' backs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("ffsd")


def lock_path(db: Path) -> Path:
    return db.with_name(f"{db.name}.lock")


def ensure_sqlite_store(db: Path) -> None:
    """Make sure a complete MLflow store exists at ``db``, building it if there is none.

    Waits (as long as it takes) while another job builds it; that job either finishes or dies,
    and either way frees the lock.
    """
    if db.is_file():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(db), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: another job is creating the MLflow store", lock_path(db))
            fcntl.flock(fd, fcntl.LOCK_EX)
        if db.is_file():  # built while this job waited
            return
        for stale in db.parent.glob(f".{db.name}.*.tmp*"):  # a creator that was killed
            stale.unlink(missing_ok=True)
        _build(db)
    finally:
        # Closing frees the lock. The file stays: removing it would let a job that opened it and
        # one that creates a new one both hold "the" lock.
        os.close(fd)


def _build(db: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{secrets.token_hex(4)}.tmp")
    try:
        # MLflow's own creation path: the tables, every migration and the default experiment,
        # whose artifacts go where this project's do (mlartifacts/ beside the store).
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        os.replace(tmp, db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("created the MLflow store %s", db)
