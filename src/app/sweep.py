"""Transitional: the names that app.main (``prepare_storage``) and app.tracking.callback (``FAILURES``, ``STATE``,
``TRACKING_ERRORS``) still import from here. They now live in :mod:`app.sweeps`; delete this module once those two
imports read ``app.sweeps.storage.prepare_storage`` and ``app.sweeps.outcomes.load(sweep_dir)`` /
``outcomes.add_tracking_errors(sweep_dir, lines)``."""

from app.sweeps import outcomes
from app.sweeps.outcomes import JobOutcome
from app.sweeps.storage import prepare_storage  # noqa: F401


class _TrackingErrors(list):
    def append(self, line: str) -> None:
        record = outcomes.latest()
        if record is not None:
            outcomes.add_tracking_errors(record.sweep_dir, [line])


def __getattr__(name: str):
    record = outcomes.latest()
    if name == "FAILURES":  # (their .line() as the report prints it)
        return [] if record is None else [JobOutcome(**{**vars(j), "overrides": record.varying(j)})
                                          for j in record.failures]
    if name == "STATE":
        return {"stopped": record.stopped if record is not None else None}
    if name == "TRACKING_ERRORS":
        return _TrackingErrors()
    raise AttributeError(name)
