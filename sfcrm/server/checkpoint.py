"""The listener's WAL checkpoints, on a thread of their own after a burst of callbacks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("sfcrm.listener")


class WalCheckpointer:
    """Copies the database's write-ahead log back into the file on a thread of its own,
    shortly after callbacks were stored.

    SQLite does this "checkpoint" inside the COMMIT of whichever write finds the log past
    1,000 pages. The listener acts on one callback at a time, so in a burst every 80th or so
    waited milliseconds for it, and every callback queued behind that one. A PASSIVE
    checkpoint blocks no reader or writer, and SQLite's own still runs should this one fall
    behind. The thread starts with the first write and ends after ``idle`` seconds without
    one, so an idle listener neither wakes up nor touches the file.

    ``checkpoint`` is the database's own (``Database.checkpoint``); only SQLite has a log to
    copy back, so the listener makes no checkpointer on another engine.
    """

    def __init__(
        self, checkpoint: Callable[[], None], *, delay: float = 0.02, idle: float = 2.0
    ) -> None:
        self.checkpoint = checkpoint
        self.delay = delay  # lets a burst gather: one checkpoint per ``delay``, not per write
        self.idle = idle
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._over = False  # stopped, or a checkpoint failed: no thread starts again

    def poke(self) -> None:
        """Something was written: checkpoint soon. Never raises."""
        with self._lock:
            self._wanted.set()
            if self._thread is None and not self._over:
                thread = threading.Thread(target=self._run, name="sfcrm-checkpoint", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had now: SQLite checkpoints meanwhile
                    return
                self._thread = thread

    def _run(self) -> None:
        try:
            while True:
                if not self._wanted.wait(self.idle):
                    with self._lock:
                        if not self._wanted.is_set():
                            self._thread = None
                            return
                    continue
                time.sleep(self.delay)
                self._wanted.clear()
                with self._lock:
                    if self._over:
                        self._thread = None
                        return
                self.checkpoint()
        except Exception as exc:
            # Not needed for correctness: SQLite checkpoints on its own. Say so once and stop.
            log.warning("checkpoints left to SQLite: %s", exc)
            with self._lock:
                self._over = True
                self._thread = None

    def stop(self, timeout: float = 5.0) -> None:
        """No checkpoint starts after this, and one under way is waited for: the database
        may be closed next, the connection it checkpoints on with it."""
        with self._lock:
            self._over = True
            thread = self._thread
        self._wanted.set()  # an idle thread wakes up to end
        if thread is not None:
            thread.join(timeout)
