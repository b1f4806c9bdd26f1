"""Records go to a tracking store from one background thread, so training never waits on it.

:meth:`Sender.submit` only appends a :class:`Record` (a closure making the store's calls) to a
queue. One daemon thread sends the queue in order; a record that fails stays at the head and is
tried again after a delay that doubles from ``retry_first_s`` to ``retry_max_s``, for as long as
the job lives, so an outage of any length costs the training loop nothing and loses nothing
once the store is back. A record the store refuses (``permanent(err)``: trying again cannot
help) is set aside instead, so that it cannot hold back the ones behind it.
:meth:`Sender.close` waits at most its timeout for the queue to drain (retrying every
:data:`CLOSING_RETRY_S` meanwhile) and returns what is left, which the tracker reports and a
relaunch sends.

Imports nothing of ffsd and nothing of MLflow: the tracker decides what a record does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("ffsd")

#: While :meth:`Sender.close` waits, a failing record is retried this often (seconds).
CLOSING_RETRY_S = 1.0
#: While the store stays down, the warning is repeated this often (seconds).
REMIND_EVERY_S = 600.0


@dataclass(frozen=True)
class Record:
    """One unit of sending. ``kind`` and ``step`` let the tracker summarise what was not sent."""

    what: str
    send: Callable[[], None]
    kind: str = "other"
    step: int | None = None


class Sender:
    """Sends :class:`Record` s in order from one daemon thread, retrying each until it succeeds."""

    def __init__(
        self,
        where: str,
        retry_first_s: float = 1.0,
        retry_max_s: float = 30.0,
        permanent: Callable[[Exception], bool] | None = None,
        name: str = "ffsd-tracking-sender",
    ) -> None:
        self.where = where
        self.permanent = permanent or (lambda err: False)
        self.retry_first_s = float(retry_first_s)
        self.retry_max_s = float(retry_max_s)
        self.name = name
        self.sent = 0
        self.failures = 0
        #: Records the store refused, set aside; :meth:`close` returns them with the unsent.
        self.rejected: list[Record] = []
        self._queue: deque[Record] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wake = 0  # bumped by close(): retry now instead of sleeping out the delay
        self._closing = False
        self._stop = False
        self._down_since: float | None = None
        self._warned_at = 0.0

    def submit(self, record: Record) -> None:
        """Queue ``record``; never blocks on the store."""
        with self._cond:
            self._queue.append(record)
            if self._stop:
                return  # closed: left for a relaunch, like everything close() returned
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def pending(self) -> list[Record]:
        """What is queued, the one being sent first."""
        with self._cond:
            return list(self._queue)

    def wait(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the queue to drain, retrying promptly; True if it did."""
        with self._cond:
            self._closing = True
            self._wake += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._queue, timeout=max(0.0, timeout_s))
            finally:
                self._closing = False

    def close(self, timeout_s: float) -> list[Record]:
        """:meth:`wait`, then stop the thread; returns the records not sent (refused first).

        A call in flight when the time is up cannot be interrupted: the daemon thread finishes it
        and exits (or dies with the process), so the job never waits longer than ``timeout_s``.
        """
        self.wait(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            return [*self.rejected, *self._queue]

    def _run(self) -> None:
        delay = self.retry_first_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                record = self._queue[0]
            try:
                record.send()
            except Exception as err:  # any failure of the store must stay out of training
                if self.permanent(err):
                    self._reject(record, err)
                    continue
                with self._cond:
                    pause = min(delay, CLOSING_RETRY_S) if self._closing else delay
                    self._failed(record, err, pause)
                    woken = self._woken(self._wake)
                    self._cond.wait_for(woken, timeout=pause)
                delay = min(delay * 2, self.retry_max_s)
                continue
            with self._cond:
                self._queue.popleft()
                self.sent += 1
                if self._down_since is not None:
                    log.info(
                        "tracking store %s answers again after %.0f s; sending the %d kept "
                        "record(s)",
                        self.where,
                        time.monotonic() - self._down_since,
                        len(self._queue),
                    )
                    self._down_since = None
                self._cond.notify_all()
            delay = self.retry_first_s

    def _reject(self, record: Record, err: Exception) -> None:
        with self._cond:
            self._queue.popleft()
            self.rejected.append(record)
            self._cond.notify_all()
        log.warning(
            "tracking store %s refused %s: %s. Set aside (a relaunch tries it again); the "
            "records behind it go on.",
            self.where,
            record.what,
            err,
        )

    def _woken(self, wake: int) -> Callable[[], bool]:
        return lambda: self._stop or self._wake != wake

    def _failed(self, record: Record, err: Exception, pause: float) -> None:
        self.failures += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = self._warned_at = now
            log.warning(
                "tracking store %s failed to record %s: %s. Training goes on; %d record(s) are "
                "kept and retried in the background (every %g s at most), and metrics.jsonl "
                "has every epoch.",
                self.where,
                record.what,
                err,
                len(self._queue),
                self.retry_max_s,
            )
        elif now - self._warned_at >= REMIND_EVERY_S:
            self._warned_at = now
            log.warning(
                "tracking store %s still fails after %.0f s (%s); %d record(s) kept",
                self.where,
                now - self._down_since,
                err,
                len(self._queue),
            )
        else:
            log.debug("%s: %s failed again, next try in %g s", self.where, record.what, pause)
