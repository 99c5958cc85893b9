"""What a job produced, read from its output dir, into its run: tags from ``run.json``, the event file as the input
dataset, metrics, the Hydra records (redacted) and the output folders as artifacts, and the registered model."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from app.store import provenance
from app.store.files import read_json
from app.tracking import backend, redaction

DATASET_ATTEMPTS = 3


def log_job(c, run_id: str, out: Path, register_model: bool, objective: float | None, parent_id: str | None,
            job_num: int) -> None:

    try:
        run_info = read_json(out / "run.json")
    except (OSError, ValueError):
        run_info = {}
    tags = {f"reused.{k}": str(v).lower() for k, v in run_info.get("reused", {}).items()}
    for stage, record in (run_info.get("cache") or {}).items():  # cache.sample.key, .status, .source, ...
        if record.get("source") and not record.get("source_run"):  # made by a job that had no run id yet
            record["source_run"] = provenance.source_run({"output_dir": record["source"]})
        tags.update({f"cache.{stage}.{k}": v for k, v in record.items()})
    if run_info.get("data_path"):
        tags.update({"data.path": run_info["data_path"], "data.sha256": run_info.get("data_sha256")})
        log_dataset(c, run_id, run_info)
    tags.update({f"objective.{k}": v for k, v in (run_info.get("objective") or {}).items()})
    tags.update({f"gpu.{k}": v for k, v in (run_info.get("gpu") or {}).items()})  # the job's GPU (app.ml.device)
    backend.set_tags(c, run_id, tags)

    try:
        metrics = read_json(out / "results" / "metrics.json")
    except (OSError, ValueError):
        metrics = {}
    triples = []
    for entry in metrics.get("loss_history", []):  # the totals and every loss term, per epoch
        for key, value in entry.items():
            if key.startswith(("train_", "val_")) and isinstance(value, (int, float)):
                triples.append((f"epoch_{key}", value, entry["epoch"]))
    triples += [(k, v, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if objective is not None:
        triples.append(("objective", objective, 0))
        if parent_id:  # the parent's chart of the objective per trial (step = job number)
            backend.log_metrics(c, parent_id, [("objective", objective, int(job_num or 0))])
    backend.log_metrics(c, run_id, triples)

    log_hydra_records(c, run_id, out / ".hydra")
    for folder in ("results", "plots", "model"):
        if (out / folder).is_dir():
            c.log_artifacts(run_id, str(out / folder), folder)
    trained_here = not run_info.get("reused", {}).get("model", True)
    if register_model and trained_here and (out / "model" / "model.json").exists():
        import mlflow

        from app.tracking import registry

        mlflow.start_run(run_id=run_id)  # the model is logged into the active run
        try:
            name, model_version = registry.log_and_register(out / "model")
        finally:
            mlflow.end_run()
        backend.set_tags(c, run_id, {"registered_model": f"{name}/{model_version}"})


def log_hydra_records(c, run_id: str, hydra_dir: Path) -> None:
    """``.hydra/{config,overrides,hydra}.yaml``, secrets redacted, as the artifacts ``hydra/``. Plain YAML in and out
    (the files as Hydra saved them, interpolations as text): cheaper than OmegaConf."""
    import yaml

    loader, dumper = getattr(yaml, "CSafeLoader", yaml.SafeLoader), getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            if (hydra_dir / name).exists():
                content = yaml.load((hydra_dir / name).read_text(), Loader=loader)
                (Path(tmp) / name).write_text(yaml.dump(redaction.redact(content), Dumper=dumper, sort_keys=False))
        if any(Path(tmp).iterdir()):
            c.log_artifacts(run_id, tmp, "hydra")


def dataset(path: str, sha256: str | None):
    """The event file as MLflow's public Dataset entity: a local source, named by the file, digest = the first 16 hex
    of its sha256 (what ``MetaDataset`` over ``resolve_dataset_source`` would record, without its private method)."""
    from mlflow.entities import Dataset

    resolved = str(Path(path).resolve())
    digest = (sha256 or hashlib.sha256(resolved.encode()).hexdigest())[:16]
    return Dataset(name=Path(path).name, digest=digest, source_type="local", source=json.dumps({"uri": resolved}))


def log_dataset(c, run_id: str, run_info: dict) -> None:
    """The event file as the run's input dataset (context ``events``)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    events = DatasetInput(dataset=dataset(run_info["data_path"], run_info.get("data_sha256")),
                          tags=[InputTag(MLFLOW_DATASET_CONTEXT, "events")])
    for attempt in range(DATASET_ATTEMPTS):
        try:
            c.log_inputs(run_id, datasets=[events])
            return
        except Exception as err:  # noqa: BLE001 - only the insert race is retried
            # The store looks the dataset up, then inserts it: jobs logging the same event file at the same
            # moment race, and all but one get a unique-key violation (PostgreSQL: "duplicate key value violates
            # unique constraint dataset_pk"; sqlite: "UNIQUE constraint failed"). The row exists now: link again.
            text = str(err).lower()
            if attempt == DATASET_ATTEMPTS - 1 or not ("duplicate key" in text or "unique constraint" in text):
                raise
            time.sleep(0.2 * (attempt + 1))
