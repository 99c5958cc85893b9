"""``run``: encode the parameters, run the workflow with yadage (local processes or every step in the image), and
report where the outputs and the MLflow parent run are, or the failing step's error. ``spec``: the resolved
workflow, e.g. docker-encapsulated for REANA."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from app.errors import UserError, first_line
from app.tracking.backend import ui_line
from app.workflow import docker, parent_run
from app.workflow.compose import default_tracking
from app.workflow.params import NONE, check_overrides, encode, expand, safe_path
from app.workflow.secrets import protect_secrets
from app.workflow.steps import SPEC, read_or_empty, step_errors

# The specs ship inside the wheel as app/yadage; in a source checkout they are workflow/yadage.
_PACKAGED = Path(__file__).resolve().parents[1] / "yadage"
WORKFLOW_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[3] / "workflow" / "yadage"
DEFAULT_METHODS = "alices,sally"
DEFAULT_IMAGE = "madminer-sweeper:latest"


def run(args) -> int:
    overrides = list(args.overrides)
    check_overrides(overrides)
    workdir = Path(args.workdir or time.strftime("workflow-runs/%Y-%m-%d/%H-%M-%S"))
    workdir = safe_path(workdir, "the workflow directory")
    if workdir.exists() and any(workdir.iterdir()):
        raise UserError(f"the workflow directory {workdir} is not empty; choose another with --workdir (WORKDIR=...)")
    safe_path(WORKFLOW_DIR, "the workflow specification directory")
    data = "toy"
    if args.data and args.data != "toy":
        data_path = Path(args.data).expanduser().resolve()
        if not data_path.is_file():
            raise UserError(f"data file not found: {data_path}; pass an existing MadMiner .h5 file (DATA=...)")
        data = str(data_path)
    uri, experiment = default_tracking(overrides)
    uri = args.tracking_uri or uri
    experiment = args.experiment or experiment
    overrides, uri, env_names = protect_secrets(overrides, uri)
    run_name = args.run_name or f"workflow-{workdir.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    env_updates = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.docker:
        data = docker.stage_data(data, workdir)
        if uri != NONE and not expand(uri).startswith(("http://", "https://")):
            server, uri = docker.serve_mlflow(workdir)
        forward = "".join(f" -e {name}" for name in env_names)  # the value comes from docker's environment
        cmd_mod = os.environ.get("PACKTIVITY_DOCKER_CMD_MOD", "--network host") + forward
        env_updates.update(PACKTIVITY_DOCKER_NOPULL="1", PACKTIVITY_DOCKER_CMD_MOD=cmd_mod)
    initdata = {"data": encode(data), "methods": encode(args.methods), "overrides": [encode(o) for o in overrides],
                "tracking_uri": encode(uri), "experiment": encode(experiment), "run_name": encode(run_name)}
    os.environ.update(env_updates)
    print(f"workflow dir: {workdir}", flush=True)
    try:
        return report(workdir, uri, run_name, _yadage(workdir, initdata, args), served=server is not None)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def report(workdir: Path, uri: str, run_name: str, failure: str | None, served: bool) -> int:
    """Print where the outputs and the parent run are, or the failing step's error (and close the parent)."""
    t = read_or_empty(workdir / "setup" / SPEC).get("tracking")
    if failure is not None:
        message = step_errors(workdir) or f"the workflow failed ({failure}); see the logs under {workdir}"
        if t:
            parent_run.fail({**t, "uri": uri}, message, only_if_running=True)
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"comparison: {workdir / 'comparing' / 'limits_by_method.png'}")
    print(f"metrics:    {workdir / 'comparing' / 'comparison.csv'}")
    if t:
        store = f"sqlite:///{workdir / 'mlflow.db'}" if served else expand(uri)
        print(f"MLflow parent run {t['parent_run_id']} ({run_name}) in experiment {t['experiment']}; {ui_line(store)}")
    return 0


def workflow_spec(image: str | None = None) -> dict:
    """The resolved workflow (steps.yml inlined); with ``image``, every step docker-encapsulated in it."""
    from yadage.workflow_loader import workflow as load_workflow

    spec = load_workflow("workflow.yml", toplevel=str(WORKFLOW_DIR))
    if image:
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        docker_env = {"environment_type": "docker-encapsulated", "image": name, "imagetag": tag,
                      "envscript": "", "resources": [], "par_mounts": [], "workdir": None, "env": {}}
        for stage in spec["stages"]:
            stage["scheduler"]["step"]["environment"] = dict(docker_env)
    return spec


def write_spec(args) -> None:
    """``spec``: write the resolved workflow (for REANA: ``--docker --image REGISTRY/NAME:TAG``)."""
    if args.docker and not args.image:
        raise UserError("--docker needs --image REGISTRY/NAME:TAG, the image the cluster pulls")
    text = json.dumps(workflow_spec(args.image if args.docker else None), indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)


def _yadage(workdir: Path, initdata: dict, args) -> str | None:
    """Run the workflow; None on success, else yadage's reason."""
    from yadage.steering_api import run_workflow
    from yadage.utils import setupbackend_fromstring

    spec = workflow_spec(args.image if args.docker else None)
    logging.getLogger("yadage").setLevel(logging.WARNING)
    try:
        run_workflow(dataarg=str(workdir), workflow_json=spec, initdata=initdata,
                     backend=setupbackend_fromstring(f"multiproc:{args.jobs}"), visualize=False, loginterval=600)
    except Exception as err:  # noqa: BLE001 - yadage raises plain exceptions for a failed step
        return first_line(err)
    return None
