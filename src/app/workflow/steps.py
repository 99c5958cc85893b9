"""The commands the workflow's steps run: ``setup``, ``step sample|train|evaluate`` and ``compare``.

Each reads its parameters percent-encoded (:mod:`.params`), writes ``publish.yml`` (what yadage passes on) into its
workdir, and on failure writes ``step_error.json`` there and ends the parent run FAILED naming the step.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from app.domain import datafile
from app.domain.methods import get_method
from app.domain.validate import check_config, check_options
from app.errors import UserError
from app.tracking.callback import PARENT_ENV  # the step's run nests under the run named there
from app.tracking.comparison import methods_overlay
from app.workflow import parent_run
from app.workflow.compose import compose, resolved_without_run
from app.workflow.params import NONE, check_overrides, data_args, decode, env_name, hydra_value

SPEC = "workflow.json"
PUBLISH = "publish.yml"
ERROR_FILE = "step_error.json"
STAGES = {"sample": "sampling", "train": "training", "evaluate": "evaluating"}


# ---------------------------------------------------------------------------- setup
def setup(args) -> None:
    """Check every method's config, make the toy file once, create the parent run, write workflow.json."""
    workdir = Path(args.workdir)
    data = decode(args.data)
    overrides = [decode(o) for o in args.overrides]
    check_overrides(overrides)
    names = [m for m in decode(args.methods).replace(" ", "").split(",") if m]
    if not names or len(set(names)) != len(names):
        raise UserError(f"methods={decode(args.methods)!r}: give one or more distinct methods, e.g. alices,sally")
    methods = [get_method(m) for m in names]
    cache_dir = workdir / "cache"
    kinds: dict[str, str] = {}
    for m in methods:  # every method's config must compose and pass the checks before any step runs
        cache = f"paths.cache_dir={hydra_value(str(cache_dir))}"
        cfg = resolved_without_run(compose([*overrides, f"training={m.name}", *data_args(data), cache]))
        check_options(cfg)  # before the toy file is made
        info = datafile.resolve(cfg.data, cfg.paths.cache_dir)  # makes the toy file once, for every step
        check_config(cfg, info)
        kinds.setdefault(m.sampling, m.name)

    tracking = None
    uri, experiment, run_name = decode(args.tracking_uri), decode(args.experiment), decode(args.run_name)
    if uri != NONE:
        tags = {"methods": ",".join(names), "overrides": " ".join(overrides), "data": data or "toy"}
        tracking = parent_run.create(uri, experiment, run_name, workdir.parent, tags)
    spec = {"methods": names, "kinds": kinds, "overrides": overrides, "cache_dir": str(cache_dir),
            "tracking": tracking, "run_name": run_name}
    (workdir / SPEC).write_text(json.dumps(spec, indent=2))
    publish(workdir, {"spec": str(workdir / SPEC), "methods": names, "kinds": list(kinds)})
    print(f"workflow {run_name}: methods {', '.join(names)}; sampling kinds {', '.join(kinds)}")


# ---------------------------------------------------------------------------- sample / train / evaluate
def step(args) -> None:
    """One ``python -m app stage=STAGE`` with the previous steps' outputs as its inputs."""
    spec = json.loads(Path(args.spec).read_text())
    workdir = Path(args.workdir)
    extra: list[str] = []
    if args.stage == "sample":
        method, label = spec["kinds"][args.kind], f"sampling ({args.kind})"
    elif args.stage == "train":
        method, label = args.method, f"training ({args.method})"
        kind = get_method(method).sampling
        samples = [p for p in map(Path, args.inputs) if read_or_empty(p / "samples.json").get("kind") == kind]
        if len(samples) != 1:
            found = f"found {len(samples)} among {' '.join(args.inputs)}"
            fail_step(spec, workdir, label, f"expected one folder of {kind} samples, {found}")
        extra = [f"sampling.samples_dir={hydra_value(str(samples[0]))}"]
    else:
        model_dir = Path(args.inputs[0])
        method = read_or_empty(model_dir / "model.json").get("method", "?")
        label = f"evaluating ({method})"
        extra = [f"training.model_dir={hydra_value(str(model_dir))}"]
    argv = [
        sys.executable, "-m", "app", *spec["overrides"], *data_args(decode(args.data)), f"training={method}",
        f"stage={args.stage}", *extra, *tracking_args(spec),
        f"paths.cache_dir={hydra_value(spec['cache_dir'])}", f"hydra.run.dir={hydra_value(str(workdir))}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec["tracking"]:
        env[PARENT_ENV] = spec["tracking"]["parent_run_id"]
    print(f"{label}: {' '.join(argv[1:])}", flush=True)
    rc, error = run_app(argv, env)
    if rc != 0:
        if spec["tracking"]:
            parent_run.end_step_runs_left_running(spec["tracking"], workdir)
        fail_step(spec, workdir, label, error or f"python -m app exited {rc}")
    out = {"sample": "samples", "train": "model", "evaluate": "results"}[args.stage]
    key = {"sample": "samples_dir", "train": "model_dir", "evaluate": "results_dir"}[args.stage]
    publish(workdir, {key: str(workdir / out)})


def tracking_args(spec: dict) -> list[str]:
    t = spec["tracking"]
    if t is None:
        return ["tracking=disabled"]
    uri = f"'{t['uri']}'" if env_name(t["uri"]) else hydra_value(t["uri"])  # credentials stay in the environment
    return [f"tracking.uri={uri}", f"tracking.experiment_name={hydra_value(t['experiment'])}"]


def run_app(argv: list[str], env: dict) -> tuple[int, str | None]:
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


# ---------------------------------------------------------------------------- compare
def compare(args) -> None:
    """Every method's metrics in a CSV and their 68 % CL contours in one plot, on the parent run."""
    spec = json.loads(Path(args.spec).read_text())
    workdir = Path(args.workdir)
    rows, runs = [], []
    for results_dir in map(Path, args.inputs):
        step_dir = results_dir.parent
        metrics = read_or_empty(results_dir / "metrics.json")
        method = read_or_empty(step_dir / "run.json").get("method") or metrics.get("method")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({"method": method, "results_dir": str(results_dir), **scalars})
        # what comparison's overlay reads of a finished MLflow run: its output dir and its method
        runs.append(SimpleNamespace(info=SimpleNamespace(status="FINISHED"),
                                    data=SimpleNamespace(tags={"output_dir": str(step_dir), "training": method})))
    if not rows:
        fail_step(spec, workdir, "comparing", "no evaluation results to compare")
    order = {m: i for i, m in enumerate(spec["methods"])}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    runs.sort(key=lambda r: order.get(r.data.tags["training"], len(order)))
    fields = ["method", *sorted({k for r in rows for k in r} - {"method", "results_dir"}), "results_dir"]
    csv_file, plot_file = workdir / "comparison.csv", workdir / "limits_by_method.png"
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    methods_overlay(runs, plot_file)
    if spec["tracking"] is not None:
        parent_run.finish(spec["tracking"], [csv_file, plot_file], {"n_methods": len(rows)})
    publish(workdir, {"plot": str(plot_file), "csv": str(csv_file)})
    print(f"comparison: {plot_file} {csv_file}")


# ---------------------------------------------------------------------------- helpers
def fail_step(spec: dict, workdir: Path, label: str, error: str) -> None:
    """Write the step's error where the runner finds it, end the parent run FAILED naming the step, and stop."""
    raise UserError(record_failure(spec, workdir, label, error))


def record_failure(spec: dict, workdir: Path, label: str, error: str) -> str:
    message = f"step {label} failed: {error}"
    (workdir / ERROR_FILE).write_text(json.dumps({"step": label, "error": error, "workdir": str(workdir)}))
    if spec.get("tracking"):
        parent_run.fail(spec["tracking"], message, failed_step=label)
    return message


def step_errors(workdir: Path) -> str | None:
    """The errors the failed steps of a workflow recorded, in one line."""
    errors = [read_or_empty(p) for p in sorted(workdir.glob(f"*/{ERROR_FILE}"))]
    return "; ".join(f"step {e['step']} failed: {e['error']} (in {e['workdir']})" for e in errors) or None


def publish(workdir: Path, outputs: dict) -> None:
    (workdir / PUBLISH).write_text(yaml.safe_dump(outputs))


def read_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
