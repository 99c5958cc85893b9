"""The end of a sweep in the terminal: one short table, then one line per failed job and exit code 1.

:class:`SweepReport` is the first entry of ``hydra.callbacks`` (conf/config.yaml), so its ``on_multirun_end`` runs
last, after the MLflow callback's. It reads the sweep's record (``<sweep dir>/sweep.json``, written by this
project's sweepers whatever the launcher) and each job's ``run.json``; it also checks the sweeper's options before
any job starts (one line and exit code 2 for a value outside its range).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from app.domain.metrics import Child, rank
from app.store.files import read_json
from app.sweeps import outcomes
from app.sweeps.storage import check_shared
from app.tracking.backend import effective_uri, ui_line

MAX_ROWS = 20  # a longer sweep shows its best jobs; sweep.json lists all of them


class SweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if not str(sweeper.get("_target_", "")).startswith("hydra_plugins.madminer_sweeper."):
            return
        from hydra_plugins.madminer_sweeper.config import check

        try:
            check(sweeper)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        unsafe = check_shared(sweeper, config.hydra.get("launcher"))
        if unsafe:
            print(f"error: {unsafe}", file=sys.stderr)
            raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _release_joblib_workers(config)
        record = outcomes.load(config.hydra.sweep.dir)
        if record is None:  # another sweeper (hydra/sweeper=basic, ...): Hydra reports its failures itself
            return
        print(summary(record, _ui_line(config)), flush=True)
        if not record.failures and not record.tracking_errors:
            return
        for line in record.failure_lines():
            print(line, file=sys.stderr)
        if record.tracking_errors:  # the jobs' work is done, but MLflow lacks part of it
            print(f"error: {len(record.failures)} of {len(record.jobs)} jobs failed; {len(record.tracking_errors)} "
                  "MLflow call(s) failed (the error lines above)", file=sys.stderr)
        raise SystemExit(1)


def _release_joblib_workers(config: DictConfig) -> None:
    """``hydra/launcher=joblib``: end the idle workers now. loky keeps them for reuse and joins them only at
    interpreter exit, while each tears down torch and MadMiner: 2.8-8 s between this table and the end of the
    command on 2 loaded cores, 0.5-0.7 s with this (docs/sweeps.md). Asking loky's public
    ``get_reusable_executor`` with ``kill_workers=True`` for an executor with other arguments than joblib's ends the
    workers of joblib's one (loky's documented behaviour); the new one starts no process until used."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if "joblib" not in target:
        return
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(kill_workers=True).shutdown(wait=True, kill_workers=True)


def _ui_line(config: DictConfig) -> str | None:
    tracking = config.get("tracking")
    if tracking is None or tracking.get("mode") == "disabled":
        return None

    uri = effective_uri(tracking)
    return ui_line(uri) if uri else None


@dataclass
class Row:
    """One job as the table shows it."""

    outcome: outcomes.JobOutcome
    overrides: list[str]  # those that tell the jobs apart
    method: str | None = None
    metric: str | None = None
    direction: str | None = None
    child: Any = None  # app.domain.metrics.Child of a finished job with an objective


def summary(record: outcomes.SweepRecord, ui: str | None = None) -> str:
    """The sweep's table: counts, each job's objective (or the best per method when the objectives are not
    comparable), where the outputs are, and how to open the runs."""
    rows = [_row(job, record.varying(job)) for job in record.jobs]
    lines = [f"sweep: {len(rows)} jobs: {record.count(outcomes.FINISHED)} finished, "
             f"{record.count(outcomes.FAILED)} failed, {record.count(outcomes.PRUNED)} pruned"]
    best, per_method, why = _rank(rows)
    if per_method is None:
        lines += _jobs_table(rows, best)
    elif not per_method:  # not even within a method (val_loss over several alphas)
        lines += [f"no best job: {why}", *_jobs_table(rows, None)]
    else:
        lines.append(f"best per method ({why}):")
        lines += _table(["method", "job", "objective", "overrides"],
                        [[m, str(r.outcome.job), f"{r.metric}={r.child.value:.6g}", " ".join(r.overrides)]
                         for m, r in per_method.items()], right=(1,))
    if record.stopped:
        lines.append(record.stopped)
    lines.append(f"outputs: {record.sweep_dir}")
    if ui:
        lines.append(ui)
    return "\n".join(lines)


def _row(job: outcomes.JobOutcome, overrides: list[str]) -> Row:

    row = Row(job, overrides)
    out = Path(job.output_dir) if job.output_dir else None
    if out is None or not (out / "run.json").exists():
        return row

    run = read_json(out / "run.json")
    objective = run.get("objective") or {}
    row.method, row.metric, row.direction = run.get("method"), objective.get("metric"), objective.get("direction")
    if job.status == outcomes.FINISHED and isinstance(job.objective, float) and row.method:
        samples_key = ((run.get("cache") or {}).get("sample") or {}).get("key")
        row.child = Child(str(job.job), row.method, job.objective, _alpha(out), samples_key, row.metric or "",
                          row.direction or "")
    return row


def _alpha(out: Path) -> str | None:
    """The job's training.alpha, as its config file (Hydra's ``.hydra/config.yaml``) has it."""
    saved = out / ".hydra" / "config.yaml"
    if not saved.exists():
        return None
    value = OmegaConf.select(OmegaConf.load(saved), "training.alpha", default=None)
    return None if value is None else str(value)


def _rank(rows: list[Row]) -> tuple[Row | None, dict[str, Row] | None, str]:
    """(the best job when the objective ranks all jobs, else None; None or the best job per method when it does
    not; why)."""

    ranked = [r for r in rows if r.child is not None]
    if not ranked:
        return None, None, ""
    by_id = {r.child.run_id: r for r in ranked}
    overall, per_method, why = rank([r.child for r in ranked])
    if overall is not None:
        return by_id[overall.run_id], None, why
    return None, {m: by_id[c.run_id] for m, c in per_method.items()}, why


def _jobs_table(rows: list[Row], best: Row | None) -> list[str]:
    metric = next((r.metric for r in rows if r.metric), None) or "objective"
    shown, note = rows, []
    if len(rows) > MAX_ROWS:
        finished = [r for r in rows if r.child is not None]
        sign = -1 if best is not None and best.direction == "maximize" else 1
        shown = sorted(finished, key=lambda r: sign * r.child.value)[: MAX_ROWS // 2]
        note = [f"(the {len(shown)} best of {len(rows)} jobs; all of them: sweep.json in the outputs folder)"]
    body = [[str(r.outcome.job), r.outcome.status, _value(r) + (" (best)" if r is best else ""),
             " ".join(r.overrides)] for r in shown]
    return _table(["job", "status", metric, "overrides"], body, right=(0,)) + note


def _value(row: Row) -> str:
    value = row.outcome.objective
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(f"{v:.6g}" for v in value)
    return "-"


def _table(header: list[str], body: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(cells) for cells in body)]
