"""Hydra callback that forwards every job to MLflow (configured under ``hydra.callbacks``).

- a run (or multirun) start checks the tracking store and creates the experiment, before any job;
- a multirun is one parent run; its id is written into the sweep dir, where every job (in this
  process or in joblib / submitit workers) reads it, so children nest under it; a single run nests
  under the run in ``$MADMINER_SWEEPER_PARENT_RUN_ID`` (a step of the Yadage workflow);
- each job is one run: the resolved config as params (batched), group choices and provenance as
  tags, then at its end the metrics, the event file as input dataset, and the artifacts;
- the run ends FINISHED, FAILED (first line of the error in a tag) or KILLED, never RUNNING.

Secrets are redacted before anything reaches MLflow. MLflow is imported lazily.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("app.tracking")

PARENT_FILE = ".mlflow_parent.json"
PARENT_ENV = "MADMINER_SWEEPER_PARENT_RUN_ID"  # a parent run given by the caller (the Yadage workflow)
_active: dict[str, Any] = {}  # the run this process is logging to: {"run_id", "uri"}


def _tracking(config: DictConfig) -> tuple[str, str | None, str]:
    """(mode, uri, experiment name); inside ``mlflow run`` the run's own store is used."""
    t = config.tracking
    uri = t.uri
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    return t.mode, uri, t.experiment_name


def _enabled(config: DictConfig) -> bool:
    return "tracking" in config and config.tracking.mode != "disabled"


def _fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


class MLflowCallback(Callback):
    def __init__(self) -> None:
        self.experiment_id: str | None = None
        self.parent: dict | None = None
        self.config: DictConfig | None = None

    # ------------------------------------------------------------------ run / multirun
    def _connect(self, config: DictConfig) -> str:
        from app import tracking

        mode, uri, name = _tracking(config)
        if not uri:
            _fail(tracking.TrackingUnavailable(
                f"tracking={mode} needs a tracking URI; set MLFLOW_TRACKING_URI or tracking.uri=..."
            ))
        try:
            self.experiment_id = tracking.ensure_experiment(uri, name)
        except tracking.TrackingUnavailable as err:
            _fail(err)
        try:  # runs left RUNNING by a process that died (kill -9, a lost node) end FAILED
            for run_id in tracking.close_orphans(tracking.client(uri), self.experiment_id):
                log.warning("closed orphaned run %s as FAILED (its process had died)", run_id)
        except Exception as err:  # noqa: BLE001 - housekeeping must not stop the run
            log.warning("could not look for orphaned runs: %s", err)
        return uri

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _enabled(config):
            self._connect(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config):
            return
        from app import tracking

        uri = self._connect(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweeper = config.hydra.sweeper
        name = sweeper.get("study_name") if "study_name" in sweeper else None
        name = name or f"sweep-{sweep_dir.name}"
        c = tracking.client(uri)
        run = c.create_run(self.experiment_id, run_name=name,
                           tags={"sweep_dir": str(sweep_dir), "kind": "sweep", **tracking.process_tags()})
        tracking.set_tags(c, run.info.run_id, {"overrides": _typed(config.hydra.overrides.task)})
        if sweeper.get("storage") or "optuna" in str(sweeper.get("_target_", "")):
            # A resumed study gets a new parent run: these tags tie every invocation to its study.
            tracking.set_tags(c, run.info.run_id, {
                "optuna.study_name": sweeper.get("study_name"),
                "optuna.storage": tracking.redact_text(str(sweeper.get("storage"))),
                "optuna.n_trials": sweeper.get("n_trials"),
            })
        self.parent = {"run_id": run.info.run_id, "experiment_id": self.experiment_id, "uri": uri}
        self.config = config
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # the jobs need the ids only; the URI (maybe with user:password@) stays out of the sweep dir
        (sweep_dir / PARENT_FILE).write_text(json.dumps({k: v for k, v in self.parent.items() if k != "uri"}))
        # Hydra skips on_multirun_end when a job's error or Ctrl-C ends the sweep: close the parent anyway.
        _watch_uncaught_exceptions()
        atexit.register(self._close_parent_at_exit)
        log.info("MLflow parent run %s (%s) in %s", name, run.info.run_id, tracking.redact_text(uri))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _enabled(config) or self.parent is None:
            return
        from app import comparison, tracking

        c = tracking.client(self.parent["uri"])
        try:
            best = comparison.summarise_sweep(c, self.parent, config)
            if best and config.tracking.register_model:
                from app import registry

                name = registry.alias_best(c, best)
                if name:
                    tracking.set_tags(c, self.parent["run_id"], {"best_model": f"models:/{name}@{registry.BEST_ALIAS}"})
            status = "FINISHED"
        except Exception as err:  # noqa: BLE001 - the sweep's summary must not leave the parent RUNNING
            log.warning("sweep comparison failed: %s", err)
            tracking.set_tags(c, self.parent["run_id"], {"error": str(err).splitlines()[0] if str(err) else "?"})
            status = "FAILED"
        from app.sweep import FAILURES, STATE

        if FAILURES:
            tracking.set_tags(c, self.parent["run_id"], {
                "failed_jobs": "; ".join(f.line() for f in FAILURES), "stopped": STATE.get("stopped")})
        c.set_terminated(self.parent["run_id"], status)
        self.parent = None

    def _close_parent_at_exit(self) -> None:
        if self.parent is None:
            return
        from app import comparison, tracking

        killed = issubclass(_uncaught.get("type") or Exception, KeyboardInterrupt)
        c = tracking.client(self.parent["uri"])
        reason = "interrupted" if killed else "the sweep ended early: a job failed (see the FAILED child runs)"
        try:
            comparison.summarise_sweep(c, self.parent, self.config)
        except Exception as err:  # noqa: BLE001 - best effort on the way out
            log.warning("sweep comparison failed: %s", err)
        tracking.set_tags(c, self.parent["run_id"], {"error": reason})
        c.set_terminated(self.parent["run_id"], "KILLED" if killed else "FAILED")
        self.parent = None

    # ------------------------------------------------------------------ jobs
    def on_job_start(self, config: DictConfig, *, task_function: Any = None, **kwargs: Any) -> None:
        if not _enabled(config):
            return
        started = time.perf_counter()
        import mlflow

        from app import tracking

        _, uri, name = _tracking(config)
        tracking.configure(uri)
        hydra = config.hydra
        parent_id = None
        if hydra.mode is not None and str(hydra.mode).endswith("MULTIRUN"):
            parent_file = Path(hydra.sweep.dir) / PARENT_FILE
            if parent_file.exists():
                parent = json.loads(parent_file.read_text())
                parent_id, experiment_id = parent["run_id"], parent["experiment_id"]
                # the parent reached the store: ride out restarts, also in a worker started before that contact
                tracking.ride_out_restarts()
        if parent_id is None and os.environ.get(PARENT_ENV):  # a step of the Yadage workflow (app.workflow)
            parent_id = os.environ[PARENT_ENV]
            experiment_id = tracking.client(uri).get_run(parent_id).info.experiment_id
        if parent_id is None:
            experiment_id = self.experiment_id or tracking.ensure_experiment(uri, name)
        env_run = os.environ.get("MLFLOW_RUN_ID")
        if env_run:  # launched by `mlflow run`: log into its run, never a duplicate
            run = mlflow.start_run(run_id=env_run)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=_run_name(config), parent_run_id=parent_id
            )
        run_id = run.info.run_id
        _active.update(run_id=run_id, uri=uri, parent_id=parent_id)
        # The pipeline records it as the producer of the stage outputs it caches (app.provenance).
        from app.io import update_json

        update_json(Path(hydra.runtime.output_dir) / "run.json", {"mlflow_run_id": run_id})
        c = tracking.client(uri)
        job_only = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        job_cfg = OmegaConf.to_container(job_only, resolve=True, enum_to_str=True)
        tracking.log_params(c, run_id, tracking.flatten(tracking.redact(job_cfg)))
        tracking.set_tags(c, run_id, {**_job_tags(config, run_id), **tracking.process_tags()})
        _active["tracking_seconds"] = time.perf_counter() - started

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _enabled(config) or not _active.get("run_id"):
            return
        from hydra.core.utils import JobStatus

        started = time.perf_counter()
        run_id = _active["run_id"]
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        try:
            _log_job_results(config, run_id, job_return)
            end_active_run("FAILED" if failed else "FINISHED", error)
            from app.io import update_json  # the job's own tracking time (bench/sweeps.py reads it)

            spent = _active.pop("tracking_seconds", 0.0) + time.perf_counter() - started
            update_json(Path(config.hydra.runtime.output_dir) / "run.json", {"tracking_seconds": round(spent, 3)})
        except Exception as err:  # noqa: BLE001 - the store went away (retries exhausted): say so in one line
            from app import tracking

            _active.pop("run_id", None)
            first = tracking.redact_text(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
            message = (
                f"MLflow tracking store unreachable while recording run {run_id} ({first[:200]}); the job's outputs "
                f"are in {config.hydra.runtime.output_dir}; once the store is back, `python -m app.tracking "
                "close-orphans` (or the next run) closes the run as FAILED"
            )
            if str(config.hydra.mode).endswith("MULTIRUN"):
                log.error("error: %s", message)
                return
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None


_uncaught: dict[str, Any] = {}


def _watch_uncaught_exceptions() -> None:
    """Remember the exception that ends the process (sys.excepthook runs before atexit handlers)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _uncaught.update(type=exc_type, message=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def end_active_run(status: str, error: BaseException | None = None) -> None:
    """End this process's job run; also called by the task wrapper on Ctrl-C and on bad input."""
    run_id = _active.pop("run_id", None)
    if run_id is None:
        return
    import mlflow

    from app import tracking

    c = tracking.client(_active["uri"])
    if error is not None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        tracking.set_tags(c, run_id, {"error": f"{type(error).__name__}: {first}"})
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        c.set_terminated(run_id, status)


def _run_name(config: DictConfig) -> str:
    method = config.training.method
    hydra = config.hydra
    if str(hydra.mode).endswith("MULTIRUN"):
        return f"{method}-{hydra.job.num}"
    if os.environ.get(PARENT_ENV):
        return f"{getattr(config.stage, 'value', config.stage)}-{method}"
    return f"{method}-{time.strftime('%H%M%S')}"


def _typed(task) -> str:
    """The overrides as typed: OmegaConf would resolve a ``${oc.env:VAR}`` inside them on access."""
    return " ".join(OmegaConf.to_container(task, resolve=False))


def _job_tags(config: DictConfig, run_id: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    hydra = config.hydra
    tags: dict[str, Any] = {
        group: choice
        for group, choice in hydra.runtime.choices.items()
        if not group.startswith(("hydra", "schema")) and choice is not None
    }
    tags.update(
        {
            "mlflow.runName": _run_name(config),
            "overrides": _typed(hydra.overrides.task),
            "job.name": hydra.job.name,
            "job.num": OmegaConf.select(config, "hydra.job.num", default=None, throw_on_missing=False),
            "output_dir": hydra.runtime.output_dir,
            "sweep_dir": hydra.sweep.dir if str(hydra.mode).endswith("MULTIRUN") else None,
            "objective.metric": config.objective.metric,
            "objective.direction": str(getattr(config.objective.direction, "value", config.objective.direction)),
        }
    )
    for package in ("madminer-sweeper", "madminer", "torch", "mlflow"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _log_job_results(config: DictConfig, run_id: str, job_return: Any) -> None:
    import mlflow

    from app import tracking

    c = tracking.client(_active["uri"])
    out = Path(config.hydra.runtime.output_dir)
    run_info = _read(out / "run.json") or {}
    tags = {f"reused.{k}": str(v).lower() for k, v in run_info.get("reused", {}).items()}
    for stage, record in (run_info.get("cache") or {}).items():  # cache.sample.key, .status, .source, ...
        tags.update({f"cache.{stage}.{k}": v for k, v in record.items()})
    if run_info.get("data_path"):
        tags.update({"data.path": run_info["data_path"], "data.sha256": run_info.get("data_sha256")})
        _log_dataset(run_info)
    tracking.set_tags(c, run_id, tags)

    objective = run_info.get("objective") or {}
    tracking.set_tags(c, run_id, {f"objective.{k}": v for k, v in objective.items()})
    metrics = _read(out / "results" / "metrics.json") or {}
    triples = []
    for entry in metrics.get("loss_history", []):  # the totals and every loss term, per epoch
        for key, value in entry.items():
            if key.startswith(("train_", "val_")) and isinstance(value, (int, float)):
                triples.append((f"epoch_{key}", value, entry["epoch"]))
    triples += [(k, v, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    value = getattr(job_return, "_return_value", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        triples.append(("objective", value, 0))
        parent_id = _active.get("parent_id")
        if parent_id:  # the parent's chart of the objective per trial (step = job number)
            job_num = OmegaConf.select(config, "hydra.job.num", default=0)
            tracking.log_metrics(c, parent_id, [("objective", value, int(job_num or 0))])
    tracking.log_metrics(c, run_id, triples)

    with tempfile.TemporaryDirectory() as tmp:
        import yaml  # plain YAML in and out (the files as Hydra saved them, interpolations as text): cheaper

        hydra_dir = out / ".hydra"
        loader, dumper = getattr(yaml, "CSafeLoader", yaml.SafeLoader), getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (hydra_dir / name).exists():
                content = yaml.load((hydra_dir / name).read_text(), Loader=loader)
                (Path(tmp) / name).write_text(yaml.dump(tracking.redact(content), Dumper=dumper, sort_keys=False))
        if any(Path(tmp).iterdir()):
            c.log_artifacts(run_id, tmp, "hydra")
    for folder in ("results", "plots", "model"):
        if (out / folder).is_dir():
            mlflow.log_artifacts(str(out / folder), folder)
    trained_here = not run_info.get("reused", {}).get("model", True)
    if config.tracking.register_model and trained_here and (out / "model" / "model.json").exists():
        from app import registry

        name, model_version = registry.log_and_register(out / "model")
        tracking.set_tags(c, run_id, {"registered_model": f"{name}/{model_version}"})


DATASET_ATTEMPTS = 3


def _log_dataset(run_info: dict) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = run_info["data_path"]
    with warnings.catch_warnings():  # MLflow warns that a local path matches two equivalent source types
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(
        source=source,
        name=Path(path).name,
        digest=(run_info.get("data_sha256") or "")[:16] or None,
    )
    for attempt in range(DATASET_ATTEMPTS):
        try:
            mlflow.log_input(dataset, context="events")
            return
        except Exception as err:  # noqa: BLE001 - only the insert race is retried
            # The store looks the dataset up, then inserts it: jobs logging the same event file at the same
            # moment race, and all but one get a unique-key violation (PostgreSQL: "duplicate key value violates
            # unique constraint dataset_pk"; sqlite: "UNIQUE constraint failed"). The row exists now: link again.
            text = str(err).lower()
            if attempt == DATASET_ATTEMPTS - 1 or not ("duplicate key" in text or "unique constraint" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
