"""MLflow off the jobs' critical path: one helper process makes the command's MLflow calls.

The helper is a ``concurrent.futures.ProcessPoolExecutor`` with one worker (started with ``spawn``): the callback
submits the plain functions of :mod:`app.tracking.calls` and goes on, and the single worker makes them in the order
they were submitted. It imports MLflow and opens the store on the idle core while Hydra composes and the first job
imports torch and MadMiner (~3-5 s of CPU that were on the critical path of every command). The command waits for the
calls it submitted where it must report their failures (a run's end, a sweep's end), and the interpreter's exit waits
for the rest, so every run's final status is in the store when the command returns.

Without a helper (``tracking.background=false``, a worker process of the joblib or submitit launcher, a helper that
cannot start) :class:`Tracker` makes the same calls in the job's own process, at once.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from app.errors import error_line
from app.tracking import calls
from app.tracking.backend import TrackingUnavailable
from app.tracking.redaction import redact_log_records

log = logging.getLogger("app.tracking")

HELPER_GONE = ("the MLflow helper process ended unexpectedly; rerun with tracking.background=false to make the "
               "calls in the job's process")


class Tracker:
    """Where this process's MLflow calls go: to the helper (``executor``) or made here at once (None)."""

    def __init__(self, executor: ProcessPoolExecutor | None = None) -> None:
        self.executor = executor
        self.pending: list[Future] = []
        self.broken = False

    @property
    def remote(self) -> bool:
        return self.executor is not None

    def submit(self, call, /, **kwargs) -> Future:
        """Hand ``call(**kwargs)`` over; its failure is kept in the future (reported by :meth:`wait`)."""
        future: Future = Future()
        try:
            if self.executor is not None:
                future = self.executor.submit(call, **kwargs)
            else:
                future.set_result(call(**kwargs))
        except Exception as err:  # noqa: BLE001 - the helper is gone (BrokenProcessPool), or the call failed here
            future.set_exception(err)
        self.pending.append(future)
        return future

    def wait(self) -> list[str]:
        """Wait for every call submitted so far: the one-line failures among them, each once."""
        pending, self.pending = self.pending, []
        lines: list[str] = []
        for future in pending:
            line = self.describe(future.exception())
            if line and line not in lines:
                lines.append(line)
        return lines

    def describe(self, err: BaseException | None) -> str | None:
        if err is None or isinstance(err, calls.Skipped):
            return None
        if isinstance(err, BrokenProcessPool):
            if self.broken:
                return None
            self.broken = True
            return HELPER_GONE
        if isinstance(err, (calls.CallFailed, TrackingUnavailable)):
            return str(err)
        return error_line(err)

    def close(self) -> None:
        """Wait for the helper's calls and for its end."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)


_current: Tracker | None = None


def current() -> Tracker | None:
    return _current


def set_current(tracker: Tracker | None) -> None:
    global _current
    _current = tracker


def start(uri: str, experiment_name: str) -> Tracker:
    """Start the helper and hand it the store's opening (its first call)."""
    tracker = Tracker(ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=prepare))
    # The first submit starts the helper process. It inherits SIGINT blocked until it ignores SIGINT (prepare): a
    # Ctrl-C while it starts must not kill it, the command ends its runs through it (as CPython starts its own
    # resource tracker).
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        first = tracker.submit(calls.open_store, uri=uri, experiment_name=experiment_name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if first.done() and isinstance(first.exception(), (BrokenProcessPool, OSError, RuntimeError)):
        tracker.executor.shutdown(wait=False)
        raise RuntimeError(f"the MLflow helper process did not start ({error_line(first.exception())})")
    return tracker


# --------------------------------------------------------------------------------------------------- in the helper
def prepare() -> None:
    """The helper's initializer: Ctrl-C is the command's; log like the command; end with the command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("app").setLevel(logging.INFO)

    redact_log_records()
    threading.Thread(target=_end_with_the_command, daemon=True).start()
    atexit.register(_exit_without_teardown)


def _end_with_the_command() -> None:
    """A command killed with SIGKILL cannot shut the executor down: end when it is gone (its runs stay RUNNING until
    the next run, or ``python -m app.tracking close-orphans``, closes them as FAILED)."""
    from multiprocessing.connection import wait

    wait([multiprocessing.parent_process().sentinel])
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """At the helper's exit its calls are done and multiprocessing has closed its queues (exit handlers that MLflow
    registered later have run, too): end without tearing down MLflow's and SQLAlchemy's modules, which took ~1.2 s
    of the command's wall time at every exit (the command waits for the helper's end; docs/mlflow.md)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
