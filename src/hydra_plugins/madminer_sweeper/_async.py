"""``hydra.sweeper.asynchronous=true``: trials that never wait for each other, and the claim of a trial.

``n_jobs`` threads of the sweep's process each loop claim -> launch -> tell: a thread claims a trial (asks the study
for it), hands it to the launcher as a batch of one (``launcher.launch([overrides], initial_job_idx=...)``: the
joblib and submitit launchers run concurrent calls side by side, each waiting only for its own job) and tells the
study how it ended, then claims the next one. So a new trial starts as soon as any running one ends.

Claims decide how many trials run: at most ``n_trials`` per invocation, or with ``n_trials_scope=study`` until the
study holds ``n_trials`` trials (RUNNING, COMPLETE, PRUNED and FAIL alike) from all workers, that is every process
that feeds the same stored study. A claim counts and asks under a lock that every worker of the study shares:
PostgreSQL's advisory lock (SQLAlchemy's public ``text()``), an ``flock`` beside a sqlite file, or a thread lock for
an in-memory study; so no trial is run twice (Optuna's storage hands each trial out once) and none beyond
``n_trials``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from app.store.files import locked, sqlite_path

log = logging.getLogger(__name__)
WAKE_S = 0.5  # how often the sweep's thread wakes up while the trial slots run


class Claims:
    """Hands out the trials of this worker: ``ask()`` -> ``(trial, job index)`` or None once the budget is spent."""

    def __init__(self, study: Any, space: dict, n_trials: int, scope: str, shared: Any) -> None:
        self.study, self.space, self.n_trials, self.scope = study, space, n_trials, scope
        self.claimed = 0
        self.asked: list[int] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._shared = shared if scope == "study" else contextlib.nullcontext
        self._needs_count = scope == "study"

    def ask(self) -> tuple[Any, int] | None:
        with self._lock, self._shared():
            if self.stopped.is_set() or (self.claimed >= self.n_trials and not self._needs_count):
                return None
            if self._needs_count and len(self.study.get_trials(deepcopy=False)) >= self.n_trials:
                return None
            trial = self.study.ask(self.space)
            self.asked.append(trial.number)
            self.claimed += 1
            return trial, self.claimed - 1

    def remaining(self) -> int:
        """How many trials a batch may still claim (an estimate for ``n_trials_scope=study``; claims decide)."""
        if self._needs_count:
            return max(0, self.n_trials - len(self.study.get_trials(deepcopy=False)))
        return max(0, self.n_trials - self.claimed)


def shared_lock(storage: Any, study_name: str):
    """A lock that every worker process of the study shares (a context manager factory); it also serialises the
    study's creation (two Optuna 2.10 processes creating the schema of a fresh PostgreSQL database at once race)."""
    url = str(storage) if storage else ""
    path = sqlite_path(url) if url else None
    if path is not None:
        return lambda: locked(path.with_name(f".{path.name}.{study_name}.claims.lock"))
    if url.startswith(("postgresql", "postgres")):
        return _advisory(url, study_name)
    return contextlib.nullcontext  # in memory: one process; another database: Optuna's own transactions only


def _advisory(url: str, study_name: str):
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    key = int.from_bytes(hashlib.sha256(f"madminer-sweeper:{study_name}".encode()).digest()[:8], "big", signed=True)

    @contextlib.contextmanager
    def hold():
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    return hold


def run(sweeper: Any, claims: Claims, build: Any, tell: Any, on_over_budget: Any) -> list[Any]:
    """Launch claimed trials as soon as a slot is free; returns the launcher's ``JobReturn`` lists (one per trial).

    ``build(trial) -> overrides``, ``tell(trial, ret) -> (error, over budget)``: the caller's, run under one lock.
    """
    slots = sweeper.n_jobs
    if type(sweeper.launcher).__name__ == "BasicLauncher" and slots > 1:
        log.info("hydra.sweeper.asynchronous: the in-process launcher runs one job at a time; "
                 "use hydra/launcher=joblib (or submitit) for %d trials at once", slots)
        slots = 1
    record_lock = threading.Lock()
    returns: list[Any] = []

    def worker() -> None:
        while not claims.stopped.is_set():
            claimed = claims.ask()
            if claimed is None:
                return
            trial, index = claimed
            with record_lock:
                overrides = build(trial)
                sweeper.validate_batch_is_legal([overrides])
            ret = sweeper.launcher.launch([overrides], initial_job_idx=index)
            with record_lock:
                returns.append(ret)
                error, over = tell(trial, ret[0])
                if over and not claims.stopped.is_set():
                    claims.stopped.set()
                    on_over_budget(error)

    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="trial-slot") as pool:
        futures = []
        try:
            futures.extend(pool.submit(worker) for _ in range(slots))
            # in slices: a Ctrl-C that the kernel hands to a slot's thread reaches this (main) thread's handler only
            # once it wakes up, and a wait without a timeout never does
            done, pending = wait(futures, timeout=WAKE_S, return_when=FIRST_EXCEPTION)
            while pending and not any(f.exception() is not None for f in done):
                done, pending = wait(futures, timeout=WAKE_S, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C in the sweep's thread: no slot claims another trial
            claims.stopped.set()
            interrupt = getattr(sweeper.launcher, "interrupt", None)
            if callable(interrupt):  # a launcher whose jobs outlive this process (SLURM) cancels them
                interrupt()
            raise
        for future in done:
            if future.exception() is not None:
                claims.stopped.set()
                wait(futures)
                raise future.exception()
    return returns
