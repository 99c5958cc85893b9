"""The workflow's MLflow parent run: created by ``setup``, FINISHED by ``compare`` with the comparison, FAILED
(with the failing step's name) by a step that fails or by the runner."""

from __future__ import annotations

from pathlib import Path

from app.tracking import backend
from app.workflow.params import expand


def client(uri: str):
    uri = expand(uri)
    backend.configure(uri)
    return backend.client(uri)


def create(uri: str, experiment: str, run_name: str, workflow_dir: Path, tags: dict) -> dict:
    """The parent run in ``experiment`` (created if missing); returns the ``tracking`` entry of workflow.json."""
    experiment_id = backend.ensure_experiment(expand(uri), experiment)
    c = client(uri)
    base = {"kind": "workflow", "workflow_dir": str(workflow_dir)}
    parent = c.create_run(experiment_id, run_name=run_name, tags=base)
    backend.set_tags(c, parent.info.run_id, tags)
    return {"uri": uri, "experiment": experiment, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id}


def fail(tracking: dict, message: str, failed_step: str | None = None, only_if_running: bool = False) -> None:
    """End the parent run FAILED with ``message`` (and the step's name) as tags."""
    c = client(tracking["uri"])
    if only_if_running and c.get_run(tracking["parent_run_id"]).info.status != "RUNNING":
        return
    tags = {"error": message, **({"failed_step": failed_step} if failed_step else {})}
    backend.set_tags(c, tracking["parent_run_id"], tags)
    c.set_terminated(tracking["parent_run_id"], "FAILED")


def finish(tracking: dict, artifacts: list[Path], tags: dict) -> None:
    """Log the comparison's files on the parent run and end it FINISHED."""
    c = client(tracking["uri"])
    for path in artifacts:
        c.log_artifact(tracking["parent_run_id"], str(path), "comparison")
    backend.set_tags(c, tracking["parent_run_id"], tags)
    c.set_terminated(tracking["parent_run_id"], "FINISHED")


def end_step_runs_left_running(tracking: dict, workdir: Path) -> None:
    """A step killed hard cannot end its own run: end it FAILED (its callback does so otherwise)."""
    c = client(tracking["uri"])
    for r in c.search_runs([tracking["experiment_id"]], f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}'"):
        if r.info.status == "RUNNING" and r.data.tags.get("output_dir") == str(workdir):
            c.set_terminated(r.info.run_id, "FAILED")
