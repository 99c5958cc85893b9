"""The Yadage workflow (``workflow/yadage/``): its runner and the commands its steps run.

``python -m app.workflow run ...`` (``madminer-workflow run``, ``make yadage-run``) encodes the
parameters, runs the workflow with yadage (local processes, or every step in the image built from
``workflow/Dockerfile`` with ``--docker``) and reports where the outputs and the MLflow parent run are.
The steps (``workflow/yadage/steps.yml``) call the other sub-commands:

- ``setup``: check the overrides for every method, create the MLflow experiment and the workflow's
  parent run, make the toy file once, write ``workflow.json`` for the other steps;
- ``step sample|train|evaluate``: one ``python -m app stage=...`` with the user's overrides, the
  previous steps' outputs as inputs, its MLflow run nested under the parent run;
- ``compare``: the overlay of every method's 68 % CL contour and a CSV of their metrics, logged on
  the parent run.

Parameters cross yadage's ``sh -c`` percent-encoded (:func:`encode`): every character outside
``[A-Za-z0-9/._,=+:@-]`` becomes ``%XX``, so no value is ever read by a shell; the steps decode them
and pass them to ``python -m app`` as quoted Hydra values in an argument list.
A failing step ends its MLflow run FAILED, and the parent run FAILED with the step's name.

Secrets never enter yadage's inputs, state or step logs (:func:`protect_secrets`): an override whose
key looks secret (token, password, ``*_key``, ...) or whose value holds ``user:password@``, and a
tracking URI with credentials, travel to the steps in environment variables
(``MADMINER_SWEEPER_SECRET_<n>``, passed into the containers with ``docker run -e NAME``); the steps
see ``${oc.env:NAME}`` in their place, which is also all that Hydra records in ``.hydra/``. A value
that is already ``${oc.env:VAR}`` passes through as that interpolation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import quote, unquote

from app.errors import UserError
from app.tracking.callback import PARENT_ENV  # the step's run nests under the run named there

# The specs ship inside the wheel as app/yadage; in a source checkout they are workflow/yadage.
_PACKAGED = Path(__file__).resolve().parent / "yadage"
WORKFLOW_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "workflow" / "yadage"
SAFE_PATH = re.compile(r"^[A-Za-z0-9/._,=+:@-]+$")
SPEC = "workflow.json"
PUBLISH = "publish.yml"
ERROR_FILE = "step_error.json"
DEFAULT_METHODS = "alices,sally"
DEFAULT_IMAGE = "madminer-sweeper:latest"
NONE = "none"
# Overrides that the workflow itself sets for every step; a user override of them is an error.
RESERVED = ("stage", "training", "hydra.run.dir", "hydra.sweep.dir", "sampling.samples_dir",
            "evaluation.results_dir", "paths.cache_dir")
STAGES = {"sample": "sampling", "train": "training", "evaluate": "evaluating"}
SECRET_ENV = "MADMINER_SWEEPER_SECRET_"
# ${oc.env:NAME} (optionally with a default), or ${oc.decode:${oc.env:NAME}}: read from the environment
ENV_REF = re.compile(
    r"^\$\{(?:oc\.env:(?P<a>[A-Za-z_]\w*)(?:,[^${}]*)?|oc\.decode:\$\{oc\.env:(?P<b>[A-Za-z_]\w*)\})\}$"
)


# ---------------------------------------------------------------------------- parameters as data
def encode(value: str) -> str:
    """Percent-encode everything a shell (or yadage's ``str.format``) could act on; '' becomes '%'."""
    if value == "":
        return "%"
    return quote(value, safe="/,=+:@").replace("~", "%7E")


def decode(value: str) -> str:
    return "" if value == "%" else unquote(value)


def hydra_value(value: str) -> str:
    """``value`` as a single-quoted Hydra override value that Hydra and OmegaConf read back unchanged."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # backslashes before a quote / at the end
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def safe_path(path: Path, what: str) -> Path:
    """Yadage puts paths into shell commands unquoted: allow only characters a shell leaves alone."""
    path = path.resolve()
    if not SAFE_PATH.match(str(path)):
        raise UserError(
            f"{what} {path} has characters that yadage would pass to a shell unquoted; choose a directory "
            "whose path holds only letters, digits and /._,=+:@-"
        )
    return path


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        if o.startswith("-"):
            raise UserError(f"{o}: only Hydra overrides (key=value) go to the workflow's steps, no options")
        if _override_key(o) in RESERVED:
            raise UserError(
                f"override {o} is set by the workflow itself for every step; choose methods with --methods "
                "(METHODS=...) and leave stage, training, hydra.run.dir and the stage inputs to the workflow"
            )


def env_name(value: str) -> str | None:
    """The environment variable a value refers to (``${oc.env:NAME}``), or None."""
    m = ENV_REF.match(value)
    return (m.group("a") or m.group("b")) if m else None


def expand(value: str) -> str:
    """A value, or the environment variable's value when it is a reference (the runner's tracking URI)."""
    name = env_name(value)
    if name is None:
        return value
    if name not in os.environ:
        raise UserError(f"{value} refers to the environment variable {name}, which is not set; export it first")
    return os.environ[name]


def protect_secrets(overrides: list[str], uri: str) -> tuple[list[str], str, list[str]]:
    """Move secret override values and a tracking URI with credentials into environment variables.

    Returns the overrides and URI with ``${oc.env:NAME}`` in place of each secret, and the names of every
    environment variable the steps need (to pass into containers). Sets them in ``os.environ``, which
    yadage's local steps inherit.
    """
    from app.tracking.backend import SECRET_KEY, URI_CREDENTIALS, redact_text

    names: list[str] = []
    safe: list[str] = []
    for o in overrides:
        key, sep, value = o.partition("=")
        bare = _override_key(o)
        if not sep or o.startswith("~"):
            safe.append(o)
            continue
        if env_name(value):
            names.append(env_name(value))
            safe.append(o)
            continue
        if not (SECRET_KEY.search(bare) or URI_CREDENTIALS.search(value) or redact_text(value) != value):
            safe.append(o)
            continue
        name = f"{SECRET_ENV}{len(names) + 1}"
        if value[:1] in "{[":  # a dict or list: decoded back to one
            os.environ[name], ref = value, f"${{oc.decode:${{oc.env:{name}}}}}"
        else:
            quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
            os.environ[name], ref = (value[1:-1] if quoted else value), f"${{oc.env:{name}}}"
        names.append(name)
        safe.append(f"{key}='{ref}'")
    if uri != NONE and env_name(uri) is None and URI_CREDENTIALS.search(uri):
        name = f"{SECRET_ENV}TRACKING_URI"
        os.environ[name], uri = uri, f"${{oc.env:{name}}}"
        names.append(name)
    elif env_name(uri):
        names.append(env_name(uri))
    return safe, uri, list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- config, tracking
def compose(overrides: list[str]):
    """The composed config (no Hydra run), as ``python -m app OVERRIDES`` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from app.config import register_configs
    from app.main import config_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"overrides {' '.join(overrides)}: {first}") from None


def default_tracking(overrides: list[str]) -> tuple[str, str]:
    """(tracking URI or ``none``, experiment) of the composed config; a relative sqlite path made absolute."""
    cfg = compose(overrides)
    t = cfg.tracking
    if t.mode == "disabled":
        return NONE, t.experiment_name or "madminer-sweeper"
    uri = t.uri
    if not uri:
        raise UserError(f"tracking={t.mode} needs a tracking URI; set MLFLOW_TRACKING_URI or --tracking-uri")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # every step runs in its own dir
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri and not uri.startswith("file:"):
        uri = str(Path(uri).resolve())
    return uri, t.experiment_name


def _client(uri: str):
    from app.tracking import backend

    uri = expand(uri)
    backend.configure(uri)
    return backend.client(uri)


# ---------------------------------------------------------------------------- step: setup
def setup(args) -> None:
    from app.domain import datafile
    from app.domain.methods import get_method
    from app.domain.validate import check_config

    workdir = Path(args.workdir)
    data = decode(args.data)
    overrides = [decode(o) for o in args.overrides]
    check_overrides(overrides)
    names = [m for m in decode(args.methods).replace(" ", "").split(",") if m]
    if not names or len(set(names)) != len(names):
        raise UserError(f"methods={decode(args.methods)!r}: give one or more distinct methods, e.g. alices,sally")
    methods = [get_method(m) for m in names]
    cache_dir = workdir / "cache"
    data_args = _data_args(data)
    kinds: dict[str, str] = {}
    for m in methods:  # every method's config must compose and pass the checks before any step runs
        cache = f"paths.cache_dir={hydra_value(str(cache_dir))}"
        cfg = _plain(compose([*overrides, f"training={m.name}", *data_args, cache]))
        info = datafile.resolve(cfg.data, cfg.paths.cache_dir)  # makes the toy file once, for every step
        check_config(cfg, info)
        kinds.setdefault(m.sampling, m.name)

    tracking = None
    uri, experiment, run_name = decode(args.tracking_uri), decode(args.experiment), decode(args.run_name)
    if uri != NONE:
        from app.tracking import backend as tr

        experiment_id = tr.ensure_experiment(expand(uri), experiment)
        c = _client(uri)
        parent = c.create_run(experiment_id, run_name=run_name,
                              tags={"kind": "workflow", "workflow_dir": str(workdir.parent)})
        tr.set_tags(c, parent.info.run_id, {"methods": ",".join(names), "overrides": " ".join(overrides),
                                            "data": data or "toy"})
        tracking = {"uri": uri, "experiment": experiment, "experiment_id": experiment_id,
                    "parent_run_id": parent.info.run_id}
    spec = {"methods": names, "kinds": kinds, "overrides": overrides, "cache_dir": str(cache_dir),
            "tracking": tracking, "run_name": run_name}
    (workdir / SPEC).write_text(json.dumps(spec, indent=2))
    _publish(workdir, {"spec": str(workdir / SPEC), "methods": names, "kinds": list(kinds)})
    print(f"workflow {run_name}: methods {', '.join(names)}; sampling kinds {', '.join(kinds)}")


def _plain(cfg):
    """The job's config resolved, as the stages see it (without the run dir, which needs a Hydra run)."""
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("paths", "hydra")])
    plain = OmegaConf.to_container(job, resolve=True, enum_to_str=True)
    plain["paths"] = {"cache_dir": cfg.paths.cache_dir}
    return OmegaConf.create(plain)


def _data_args(data: str) -> list[str]:
    return [] if data == "toy" else ["data=file", f"data.path={hydra_value(data)}"]


# ---------------------------------------------------------------------------- steps: sample/train/evaluate
def step(args) -> None:
    from app.domain.methods import get_method

    spec = json.loads(Path(args.spec).read_text())
    workdir = Path(args.workdir)
    extra: list[str] = []
    if args.stage == "sample":
        method, label = spec["kinds"][args.kind], f"sampling ({args.kind})"
    elif args.stage == "train":
        method, label = args.method, f"training ({args.method})"
        kind = get_method(method).sampling
        samples = [p for p in map(Path, args.inputs) if _read(p / "samples.json").get("kind") == kind]
        if len(samples) != 1:
            found = f"found {len(samples)} among {' '.join(args.inputs)}"
            _fail_step(spec, workdir, label, f"expected one folder of {kind} samples, {found}")
        extra = [f"sampling.samples_dir={hydra_value(str(samples[0]))}"]
    else:
        model_dir = Path(args.inputs[0])
        method = _read(model_dir / "model.json").get("method", "?")
        label = f"evaluating ({method})"
        extra = [f"training.model_dir={hydra_value(str(model_dir))}"]
    argv = [
        sys.executable, "-m", "app", *spec["overrides"], *_data_args(decode(args.data)), f"training={method}",
        f"stage={args.stage}", *extra, *_tracking_args(spec),
        f"paths.cache_dir={hydra_value(spec['cache_dir'])}", f"hydra.run.dir={hydra_value(str(workdir))}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec["tracking"]:
        env[PARENT_ENV] = spec["tracking"]["parent_run_id"]
    print(f"{label}: {' '.join(argv[1:])}", flush=True)
    rc, error = _run(argv, env)
    if rc != 0:
        _end_runs_left_running(spec, workdir)
        _fail_step(spec, workdir, label, error or f"python -m app exited {rc}")
    out = {"sample": "samples", "train": "model", "evaluate": "results"}[args.stage]
    key = {"sample": "samples_dir", "train": "model_dir", "evaluate": "results_dir"}[args.stage]
    _publish(workdir, {key: str(workdir / out)})


def _tracking_args(spec: dict) -> list[str]:
    t = spec["tracking"]
    if t is None:
        return ["tracking=disabled"]
    uri = f"'{t['uri']}'" if env_name(t["uri"]) else hydra_value(t["uri"])  # credentials stay in the environment
    return [f"tracking.uri={uri}", f"tracking.experiment_name={hydra_value(t['experiment'])}"]


def _run(argv: list[str], env: dict) -> tuple[int, str | None]:
    """Run without a shell, pass the output through, return (exit code, its last ``error:`` line)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    error = None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("error: "):
            error = line[len("error: "):].strip()
        elif error is None and re.match(r"^\w+(Error|Exception): ", line):
            error = line.strip()
    return proc.wait(), error


def _end_runs_left_running(spec: dict, workdir: Path) -> None:
    """A step killed hard cannot end its own run: end it FAILED (its callback does so otherwise)."""
    t = spec["tracking"]
    if t is None:
        return
    c = _client(t["uri"])
    for r in c.search_runs([t["experiment_id"]], f"tags.mlflow.parentRunId = '{t['parent_run_id']}'"):
        if r.info.status == "RUNNING" and r.data.tags.get("output_dir") == str(workdir):
            c.set_terminated(r.info.run_id, "FAILED")


def _fail_step(spec: dict, workdir: Path, label: str, error: str) -> None:
    raise UserError(_record_failure(spec, workdir, label, error))


def _record_failure(spec: dict, workdir: Path, label: str, error: str) -> str:
    """Write the step's error where the runner finds it; end the parent run FAILED naming the step."""
    message = f"step {label} failed: {error}"
    (workdir / ERROR_FILE).write_text(json.dumps({"step": label, "error": error, "workdir": str(workdir)}))
    t = spec.get("tracking")
    if t:
        from app.tracking import backend

        c = _client(t["uri"])
        backend.set_tags(c, t["parent_run_id"], {"error": message, "failed_step": label})
        c.set_terminated(t["parent_run_id"], "FAILED")
    return message


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------------- step: compare
def compare(args) -> None:
    """Every method's metrics in a CSV and their 68 % CL contours in one plot, on the parent run."""
    from types import SimpleNamespace

    from app.tracking.comparison import _methods_overlay

    spec = json.loads(Path(args.spec).read_text())
    workdir = Path(args.workdir)
    rows, runs = [], []
    for results_dir in map(Path, args.inputs):
        step_dir = results_dir.parent
        method = _read(step_dir / "run.json").get("method") or _read(results_dir / "metrics.json").get("method")
        metrics = _read(results_dir / "metrics.json")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({"method": method, "results_dir": str(results_dir), **scalars})
        # what comparison's overlay reads of a finished MLflow run: its output dir and its method
        runs.append(SimpleNamespace(info=SimpleNamespace(status="FINISHED"),
                                    data=SimpleNamespace(tags={"output_dir": str(step_dir), "training": method})))
    if not rows:
        _fail_step(spec, workdir, "comparing", "no evaluation results to compare")
    order = {m: i for i, m in enumerate(spec["methods"])}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    runs.sort(key=lambda r: order.get(r.data.tags["training"], len(order)))
    fields = ["method", *sorted({k for r in rows for k in r} - {"method", "results_dir"}), "results_dir"]
    csv_file, plot_file = workdir / "comparison.csv", workdir / "limits_by_method.png"
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    _methods_overlay(runs, plot_file)
    t = spec["tracking"]
    if t is not None:
        from app.tracking import backend

        c = _client(t["uri"])
        for path in (csv_file, plot_file):
            c.log_artifact(t["parent_run_id"], str(path), "comparison")
        backend.set_tags(c, t["parent_run_id"], {"n_methods": len(rows)})
        c.set_terminated(t["parent_run_id"], "FINISHED")
    _publish(workdir, {"plot": str(plot_file), "csv": str(csv_file)})
    print(f"comparison: {plot_file} {csv_file}")


# ---------------------------------------------------------------------------- helpers
def _publish(workdir: Path, outputs: dict) -> None:
    import yaml

    (workdir / PUBLISH).write_text(yaml.safe_dump(outputs))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- the runner
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
        data = _stage_data(data, workdir)
        if uri != NONE and not expand(uri).startswith(("http://", "https://")):
            server, uri = _serve_mlflow(workdir)
        forward = "".join(f" -e {name}" for name in env_names)  # the value comes from docker's environment
        cmd_mod = os.environ.get("PACKTIVITY_DOCKER_CMD_MOD", "--network host") + forward
        env_updates.update(PACKTIVITY_DOCKER_NOPULL="1", PACKTIVITY_DOCKER_CMD_MOD=cmd_mod)
    initdata = {"data": encode(data), "methods": encode(args.methods), "overrides": [encode(o) for o in overrides],
                "tracking_uri": encode(uri), "experiment": encode(experiment), "run_name": encode(run_name)}
    os.environ.update(env_updates)
    print(f"workflow dir: {workdir}", flush=True)
    try:
        return _report(workdir, uri, run_name, _yadage(workdir, initdata, args), served=server is not None)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def _report(workdir: Path, uri: str, run_name: str, failure: str | None, served: bool) -> int:
    """Print where the outputs and the parent run are, or the failing step's error (and close the parent)."""
    spec = _read(workdir / "setup" / SPEC)
    t = spec.get("tracking")
    if failure is not None:
        message = _step_error(workdir) or f"the workflow failed ({failure}); see the logs under {workdir}"
        if t:
            c = _client(uri)
            if c.get_run(t["parent_run_id"]).info.status == "RUNNING":
                from app.tracking import backend

                backend.set_tags(c, t["parent_run_id"], {"error": message})
                c.set_terminated(t["parent_run_id"], "FAILED")
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"comparison: {workdir / 'comparing' / 'limits_by_method.png'}")
    print(f"metrics:    {workdir / 'comparing' / 'comparison.csv'}")
    if t:
        from app.tracking.backend import redact_text

        shown_uri = redact_text(expand(uri))
        ui = shown_uri if not shown_uri.startswith("http") else None
        shown = f"mlflow ui --backend-store-uri {ui} --host 127.0.0.1" if ui else shown_uri
        if served:
            shown = f"mlflow ui --backend-store-uri sqlite:///{workdir / 'mlflow.db'} --host 127.0.0.1"
        print(f"MLflow parent run {t['parent_run_id']} ({run_name}) in experiment {t['experiment']}: {shown}")
    return 0


def workflow_spec(image: str | None = None) -> dict:
    """The resolved workflow (steps.yml inlined); with ``image``, every step docker-encapsulated in it."""
    from yadage.workflow_loader import workflow as load_workflow

    spec = load_workflow("workflow.yml", toplevel=str(WORKFLOW_DIR))
    if image:
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        docker = {"environment_type": "docker-encapsulated", "image": name, "imagetag": tag,
                  "envscript": "", "resources": [], "par_mounts": [], "workdir": None, "env": {}}
        for stage in spec["stages"]:
            stage["scheduler"]["step"]["environment"] = dict(docker)
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
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _step_error(workdir: Path) -> str | None:
    errors = [_read(p) for p in sorted(workdir.glob(f"*/{ERROR_FILE}"))]
    return "; ".join(f"step {e['step']} failed: {e['error']} (in {e['workdir']})" for e in errors) or None


def _stage_data(data: str, workdir: Path) -> str:
    """Containers see only the workflow dir: link (or copy) the event file into yadage's init folder."""
    if data == "toy":
        return data
    import shutil

    target = workdir / "init" / Path(data).name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(data, target)
    except OSError:
        shutil.copy2(data, target)
    return str(target)


def _serve_mlflow(workdir: Path):
    """Containers cannot open the host's sqlite file: serve a store in the workflow dir on loopback."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination",
            str(workdir / "mlartifacts")]
    log_file = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    server = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            print(f"MLflow server for the containers: {uri} (store {workdir / 'mlflow.db'})", flush=True)
            return server, uri
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    server.kill()
    raise UserError(f"the MLflow server for the containers did not start; see {workdir / 'mlflow-server.log'}")


# ---------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="madminer-workflow", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the workflow (make yadage-run)")
    r.add_argument("overrides", nargs="*", help="Hydra overrides for every step, e.g. +experiment=seed_workflow")
    r.add_argument("--data", default="toy", help="MadMiner event file (default: the embedded toy)")
    r.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    r.add_argument("--tracking-uri", help="MLflow URI, or 'none' (default: tracking.* of the overrides)")
    r.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment_name)")
    r.add_argument("--run-name", help="name of the workflow's parent run (default: workflow-<dir name>)")
    r.add_argument("--workdir", help="where the steps write (default workflow-runs/DATE/TIME)")
    r.add_argument("--jobs", type=int, default=2, help="steps run in parallel (default 2)")
    r.add_argument("--docker", action="store_true", help="run every step in the image (make image)")
    r.add_argument("--image", default=DEFAULT_IMAGE, help=f"the step image (default {DEFAULT_IMAGE})")

    w = sub.add_parser("spec", help="write the resolved workflow, e.g. docker-encapsulated for REANA")
    w.add_argument("--docker", action="store_true")
    w.add_argument("--image")
    w.add_argument("-o", "--output", help="file to write (default: stdout)")

    s = sub.add_parser("setup", help="(step) check, create the parent run, write workflow.json")
    for name in ("workdir", "data", "methods", "tracking-uri", "experiment", "run-name"):
        s.add_argument(f"--{name}", required=True)
    s.add_argument("--overrides", nargs="*", default=[])

    st = sub.add_parser("step", help="(step) python -m app stage=STAGE with the workflow's inputs")
    st.add_argument("stage", choices=list(STAGES))
    for name in ("spec", "workdir", "data"):
        st.add_argument(f"--{name}", required=True)
    st.add_argument("--kind")
    st.add_argument("--method")
    st.add_argument("--inputs", nargs="*", default=[])

    c = sub.add_parser("compare", help="(step) the methods' overlay and metrics CSV on the parent run")
    c.add_argument("--spec", required=True)
    c.add_argument("--workdir", required=True)
    c.add_argument("--inputs", nargs="*", default=[])
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        if args.command == "run":
            raise SystemExit(run(args))
        if args.command == "spec":
            return write_spec(args)
        try:
            {"setup": setup, "step": step, "compare": compare}[args.command](args)
        except Exception as err:  # noqa: BLE001 - a failing step names itself, on the parent run too
            workdir = Path(args.workdir)
            if isinstance(err, UserError) and (workdir / ERROR_FILE).exists():
                raise  # already recorded by _fail_step
            if not isinstance(err, UserError):
                traceback.print_exc()
            label = STAGES[args.stage] if args.command == "step" else args.command
            spec = _read(Path(args.spec)) if getattr(args, "spec", None) else {}
            error = _first_line(err) if isinstance(err, UserError) else f"{type(err).__name__}: {_first_line(err)}"
            raise UserError(_record_failure(spec, workdir, label, error)) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
