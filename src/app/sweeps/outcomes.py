"""What became of each job of a sweep, and the failure budget over all of them.

The sweepers (``hydra_plugins.madminer_sweeper``) turn every :class:`hydra.core.utils.JobReturn` into a
:class:`JobOutcome` through its public interface (``status``, ``overrides``, ``hydra_cfg``, and ``return_value``,
which raises the job's error), add it to the sweep's :class:`SweepRecord` and save that as ``<sweep dir>/sweep.json``
after every batch (atomically: a sweep killed half-way leaves the record of the batches that ended). The report
(:mod:`app.sweeps.report`) and the tracking callback read that file, so neither depends on the launcher.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.errors import Pruned, error_line
from app.store.files import read_json, write_json
from app.tracking.redaction import redact_text

SWEEP_FILE = "sweep.json"
FINISHED, FAILED, PRUNED = "finished", "failed", "pruned"
REPORT_TARGET = "app.sweeps.report.SweepReport"  # the callback that ends this app's sweeps (conf/config.yaml)


@dataclass
class JobOutcome:
    job: int
    overrides: list[str]
    status: str  # FINISHED | FAILED | PRUNED
    objective: float | list[float] | None = None
    error: str | None = None  # "Type: first line of the message" for a failed job
    output_dir: str | None = None

    def line(self, overrides: list[str] | None = None) -> str:
        shown = self.overrides if overrides is None else overrides
        return f"failed: job {self.job} [{' '.join(shown)}]: {self.error}"


def outcome(ret: Any, job: int) -> tuple[JobOutcome, BaseException | None]:
    """A job's outcome from its ``JobReturn`` (and the job's exception, when it failed)."""
    from hydra.core.utils import JobStatus
    from omegaconf import OmegaConf

    hydra_cfg = ret.hydra_cfg  # None for a job that failed before it started

    def select(key: str, default: Any) -> Any:
        return default if hydra_cfg is None else OmegaConf.select(hydra_cfg, key, default=default)

    # secrets (a token in an override, user:password@ in a URI) never reach the sweep's record
    found = JobOutcome(int(select("hydra.job.num", job)), [redact_text(str(o)) for o in ret.overrides or []], FINISHED,
                       output_dir=select("hydra.runtime.output_dir", None))
    if ret.status != JobStatus.COMPLETED:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # Hydra writes "Error executing job ..." first
                value = ret.return_value  # raises the job's own exception
            error: BaseException = RuntimeError(f"job ended with status {ret.status.name} ({value!r})")
        except Exception as err:  # noqa: BLE001 - whatever the task raised is the job's failure
            error = err
        if isinstance(error, Pruned):  # the search's pruner stopped it: not a failure, no objective
            found.status = PRUNED
            return found, error
        found.status, found.error = FAILED, redact_text(error_line(error))
        return found, error
    found.objective = _number(ret.return_value)
    return found, None


def _number(value: Any) -> float | list[float] | None:
    """The objective as plain JSON numbers (NaN and infinities become None); None when the task returned none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (list, tuple)):
        values = [_number(v) for v in value]
        return None if any(v is None or isinstance(v, list) for v in values) else values
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class SweepRecord:
    """The outcomes of one sweep (one invocation), and why it stopped early, if it did."""

    sweep_dir: str
    max_failure_rate: float = 1.0
    jobs: list[JobOutcome] = field(default_factory=list)
    stopped: str | None = None
    tracking_errors: list[str] = field(default_factory=list)  # MLflow calls that failed for good, one line each

    def add(self, ret: Any) -> tuple[JobOutcome, BaseException | None]:
        """Record the next job's ``JobReturn``: its outcome, and its exception when it failed."""
        found, error = outcome(ret, len(self.jobs))
        self.jobs.append(found)
        return found, error

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    @property
    def failures(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status == FAILED]

    def varying(self, job: JobOutcome) -> list[str]:
        """The job's overrides that not every job of the sweep shares (what tells the jobs apart)."""
        if len(self.jobs) < 2:
            return job.overrides
        common = set.intersection(*(set(j.overrides) for j in self.jobs))
        return [o for o in job.overrides if o not in common]

    def failure_lines(self) -> list[str]:
        """``failed: job N [overrides]: Type: first line``, one per failed job."""
        return [j.line(self.varying(j)) for j in self.failures]

    def over_budget(self) -> bool:
        """More than ``max_failure_rate`` of all jobs so far failed: sets ``stopped`` and says so."""
        failed = self.count(FAILED)
        if not failed or failed / len(self.jobs) <= self.max_failure_rate:
            return False
        self.stopped = (f"stopped after {len(self.jobs)} jobs: {failed} failed, more than "
                        f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")
        return True

    def save(self) -> None:

        write_json(Path(self.sweep_dir) / SWEEP_FILE, asdict(self))


def load(sweep_dir: str | Path) -> SweepRecord | None:
    """The record a sweeper of this project wrote into ``sweep_dir`` (None for another sweeper's sweep)."""

    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        return None
    data = read_json(path)
    data["jobs"] = [JobOutcome(**j) for j in data.get("jobs", [])]
    return SweepRecord(**data)


def add_tracking_errors(sweep_dir: str | Path, lines: list[str]) -> None:
    """Record MLflow calls of the sweep that failed for good: the report ends the sweep with exit code 1."""
    record = load(sweep_dir)
    if record is not None and lines:
        record.tracking_errors.extend(lines)
        record.save()


def reported(config: Any) -> bool:
    """Whether this app's report ends the sweep (then an exceeded budget is its exit code 1); without it (another
    Hydra app) the sweeper raises, so that the command fails as with Hydra's own sweepers."""
    from omegaconf import OmegaConf

    callbacks = OmegaConf.select(config, "hydra.callbacks", default=None) or {}
    return any(str(OmegaConf.select(c, "_target_", default="")) == REPORT_TARGET for c in callbacks.values())


class BudgetExceeded(RuntimeError):
    """More jobs failed than ``hydra.sweeper.max_failure_rate`` allows (raised where no report ends the sweep)."""


def stop(record: SweepRecord, config: Any, first_error: BaseException | None) -> None:
    """End the sweep once it is over budget: log the reason; raise for an app without this project's report."""
    import logging

    logging.getLogger("app.sweeps").error("%s", record.stopped)
    if not reported(config):
        first = record.failure_lines()[0] if record.failures else ""
        raise BudgetExceeded(f"{record.stopped}; {first}") from first_error
