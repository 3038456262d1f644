"""Hang watchdog: a rank that has not finished a step or a save within the limit prints the
stack of every thread, each line tagged with its rank, and exits with code 3.

A stuck rank (a dead node, an NCCL hang, a filesystem that stopped answering) otherwise
holds the whole allocation: the other ranks wait in their next collective until the
process-group timeout, and nothing says where anyone was. Here every rank arms a deadline at
the start of each step (and of each save); if it passes, the rank dumps its threads and
leaves, so the job ends within the limit and the scheduler can requeue it. A save that does
not finish never replaces `latest` (checkpoint/directory.py commits it last), so the last
complete checkpoint is where the requeued job resumes.

Why not only `faulthandler.dump_traceback_later(exit=True)`: its output cannot be tagged
with the rank (a job's ranks share one log) and it exits 1, the code of non-finite runs. So
a Python thread does the dump (tagged, exit 3); `dump_traceback_later` stays armed as a
backstop a little later, for a rank whose main thread holds the GIL in C code and so never
lets that thread run (collectives release the GIL; a pure C loop might not).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import tempfile
import threading
import time

EXIT_CODE = 3  # README fault table: a hung step or save
BACKSTOP_S = 30.0  # after the limit, the GIL-free dump of faulthandler (exit 1)


def _fd_stream():
    """The process's stderr, if it has a file descriptor (faulthandler writes to fds; a
    test may have swapped sys.stderr for a StringIO)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return None


class Watchdog:
    """Arms a deadline around each step or save of this rank.

    Args:
        limit_s: seconds a watched block may take (0 = off: `watch` does nothing).
        rank: global rank, printed on every line of the dump.
    """

    def __init__(self, limit_s: float, rank: int):
        self.limit_s = float(limit_s)
        self.rank = rank
        self._lock = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.limit_s > 0:
            self._thread = threading.Thread(target=self._run, name="megatron-rlp-watchdog",
                                            daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str):
        """Run the block under the deadline; `what` names it in the dump ("step 12")."""
        if self._thread is None:
            yield
            return
        with self._lock:
            self._deadline, self._what = time.monotonic() + self.limit_s, what
            self._lock.notify()
        backstop = _fd_stream()
        if backstop is not None:
            faulthandler.dump_traceback_later(self.limit_s + BACKSTOP_S, exit=True,
                                              file=backstop)
        try:
            yield
        finally:
            if backstop is not None:
                faulthandler.cancel_dump_traceback_later()
            with self._lock:
                self._deadline = None
                self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed, self._deadline = True, None
            self._lock.notify()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(timeout=left)
                    continue
                self._fire(self._what)

    def _fire(self, what: str) -> None:
        """Dump every thread's stack, tagged `[rank R]`, to stderr; leave with EXIT_CODE."""
        tag = f"[rank {self.rank}]"
        lines = [f"{tag} [watchdog] {what} did not finish within {self.limit_s:g} s "
                 f"(train.watchdog_minutes): stacks of every thread follow; exiting "
                 f"{EXIT_CODE}, the last complete checkpoint stays `latest`"]
        try:
            with tempfile.TemporaryFile(mode="w+") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                lines += [f"{tag} {line.rstrip()}" for line in f]
        except Exception as e:  # noqa: BLE001 - leave anyway
            lines.append(f"{tag} (stack dump failed: {e!r})")
        try:
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_CODE)  # no cleanup: other threads may hold locks forever
