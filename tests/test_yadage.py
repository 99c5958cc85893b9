"""The Yadage workflow (workflow/yadage, app.workflow): specs, parameters as data, local and container runs."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

from app.workflow import decode, encode, hydra_value

SPECS = REPO / "workflow" / "yadage"
STEPS = ("setup", "sampling", "training", "evaluating", "comparing")
# A file name a shell would act on in many ways; the workflow must treat it as a plain value.
WEIRD = "ev 'single' \"double\"; $(touch PWNED) `touch PWNED` {workdir} ~x *.h5"
TINY_FILE = [o for o in TINY if not o.startswith("data.")]  # the toy's own settings do not apply to data=file


def _env(cache_dir: Path) -> dict:
    return dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))


def _workflow(tmp_path: Path, cache_dir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app.workflow", "run", "--workdir", str(tmp_path / "wf"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout)
    proc.out = proc.stdout + proc.stderr
    return proc


def _runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = c.get_experiment_by_name("madminer-sweeper")
    runs = c.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kind") == "workflow"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return c, parents[0], children, runs


def _toy_copy(cache_dir: Path, target: Path) -> Path:
    from app.toy import simulator

    source = simulator.ensure_toy_file(simulator.ToySettings(n_events=4000, seed=3), cache_dir)
    shutil.copy(source, target)
    return target


def _no_side_effects(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.rglob("PWNED")), "a parameter was executed by a shell"


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize("step", STEPS)
def test_packtivity_validate_step(step):
    cmd = ["packtivity-validate", "-t", str(SPECS), f"steps.yml#/{step}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_yadage_validate_workflow():
    proc = subprocess.run(["yadage-validate", "-t", str(SPECS), "workflow.yml"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validates" in proc.stdout


def test_docker_spec_is_generated_from_the_one_steps_file(tmp_path):
    """REANA's and --docker's workflow: every step of steps.yml, its environment swapped, still valid."""
    import json

    out = tmp_path / "workflow.json"
    cmd = [sys.executable, "-m", "app.workflow", "spec", "--docker", "--image", "reg.example:5000/team/msw:1.2", "-o",
           str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=_env(tmp_path))
    stages = json.loads(out.read_text())["stages"]
    assert [s["name"] for s in stages] == list(STEPS)
    for stage in stages:
        env = stage["scheduler"]["step"]["environment"]
        assert (env["environment_type"], env["image"], env["imagetag"]) == (
            "docker-encapsulated", "reg.example:5000/team/msw", "1.2")
        assert stage["scheduler"]["step"]["process"]["cmd"].startswith("python -m app.workflow ")
    proc = subprocess.run(["yadage-validate", "-t", str(tmp_path), out.name], capture_output=True, text=True)
    assert proc.returncode == 0 and "validates" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- parameters as data
@pytest.mark.parametrize("value", [WEIRD, "plain", "", "%41 100%", "a\\b\\", "it's", "x=${y} and ${oops}", "\n\t"])
def test_encoded_values_are_inert_in_sh_and_decode_back(value, tmp_path):
    encoded = encode(value)
    out = subprocess.run(["sh", "-c", f"printf '%s\\n' {encoded}"], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout == encoded + "\n"  # one word, nothing expanded, nothing run
    assert "{" not in encoded and "}" not in encoded  # yadage str.format()s parameter values
    assert decode(encoded) == value
    _no_side_effects(tmp_path)


def test_hydra_values_reach_the_config_unchanged():
    from app.workflow import compose

    for value in (WEIRD, "it's \\'x\\' end\\", "${oc.env:HOME}"):
        cfg = compose(["data=file", f"data.path={hydra_value(value)}"])
        assert cfg.data.path == value


@pytest.mark.slow
def test_setup_step_through_packtivity_keeps_values_as_data(tmp_path, cache_dir):
    """The setup step as packtivity runs it (`sh -c` on the interpolated command), with hostile values."""
    import json

    import yaml

    data = _toy_copy(cache_dir, tmp_path / WEIRD)
    run_name = "run \"a\" 'b'; $(touch PWNED)"
    pars = {"data": encode(str(data)), "methods": encode("alices,sally"), "workdir": str(tmp_path / "setup"),
            "overrides": [encode(o) for o in ["training.n_epochs=2", "+vars.note='$(touch PWNED) `touch PWNED`'"]],
            "tracking_uri": encode(f"sqlite:///{tmp_path / 'mlflow.db'}"), "experiment": encode("madminer-sweeper"),
            "run_name": encode(run_name)}
    (tmp_path / "pars.yml").write_text(yaml.safe_dump(pars))
    proc = subprocess.run(["packtivity-run", "-t", str(SPECS), "steps.yml#/setup", "pars.yml", "-w", pars["workdir"]],
                          cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = json.loads((tmp_path / "setup" / "workflow.json").read_text())
    assert spec["overrides"] == ["training.n_epochs=2", "+vars.note='$(touch PWNED) `touch PWNED`'"]
    assert spec["kinds"] == {"ratio": "alices", "local": "sally"}
    assert spec["run_name"] == run_name
    _, parent, _, _ = _runs(tmp_path)
    assert parent.info.run_name == run_name and parent.data.tags["data"] == str(data)
    _no_side_effects(tmp_path, Path.cwd())


# ---------------------------------------------------------------------------- runner input checks
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "has space/wf"], "holds only letters"),
        (["training=sally"], "set by the workflow itself"),
        (["--data", "missing.h5"], "data file not found"),
        (["trainin.n_epochs=2"], "overrides"),
    ],
)
def test_runner_rejects_bad_input_in_one_line(tmp_path, cache_dir, args, message):
    cmd = [sys.executable, "-m", "app.workflow", "run", *args]
    if "--workdir" not in args:
        cmd += ["--workdir", str(tmp_path / "wf")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "wf" / "_yadage").exists()


# ---------------------------------------------------------------------------- local runs
def _pixels_of(png: Path, rgb: tuple[int, int, int]) -> int:
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(png)[..., :3]
    return int((np.abs(image - np.array(rgb) / 255).max(axis=-1) < 0.08).sum())


@pytest.mark.slow
def test_local_run_alices_and_sally(tmp_path, cache_dir):
    """The whole workflow in local processes, on a toy file whose name a shell would act on."""
    data = _toy_copy(cache_dir, tmp_path / WEIRD)
    proc = _workflow(tmp_path, cache_dir, "--data", str(data), "--methods", "alices,sally", "--run-name", "wf; $(x)",
                     *TINY_FILE)
    assert proc.returncode == 0, proc.out[-6000:]
    _no_side_effects(tmp_path, Path.cwd())
    out = tmp_path / "wf" / "comparing"
    assert f"comparison: {out / 'limits_by_method.png'}" in proc.stdout

    c, parent, children, runs = _runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "wf; $(x)"
    assert f"MLflow parent run {parent.info.run_id}" in proc.stdout
    names = {"sample-alices", "sample-sally", "train-alices", "train-sally", "evaluate-alices", "evaluate-sally"}
    assert {r.info.run_name for r in children} == names and len(runs) == 1 + len(names)  # every step's run nests
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["data.path"] for r in children} == {str(data)}  # the file itself, not a mangled name

    with open(out / "comparison.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"alices", "sally"}
    evaluated = {r.data.tags["training"]: r for r in children if r.info.run_name.startswith("evaluate-")}
    for method, row in rows.items():  # the CSV holds each method's own evaluation
        metrics = evaluated[method].data.metrics
        for key in ("val_loss", "limits_histo_cl68_fraction", "limits_cl68_area", "fisher_rate_eigenvalue"):
            assert float(row[key]) == pytest.approx(metrics[key], rel=1e-9)
    assert rows["sally"]["fisher_full_gain_over_histo"] and not rows["alices"]["fisher_full_gain_over_histo"]
    assert rows["alices"]["limits_ml_cl68_fraction"] and rows["sally"]["limits_sally_cl68_fraction"]

    png = out / "limits_by_method.png"
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's C0, C1: alices and sally contours
    assert _pixels_of(png, blue) > 150 and _pixels_of(png, orange) > 150
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.csv", "comparison/limits_by_method.png"}


# A failing step (its MLflow run and the parent FAILED, the runner's one line, no later step) is checked on the
# same workflow run as the secrets: tests/reliability/test_secrets.py::test_secrets_stay_out_of_the_yadage_workflow.


# ---------------------------------------------------------------------------- containers
@pytest.mark.docker
@pytest.mark.skipif(os.environ.get("MADMINER_SWEEPER_DOCKER_TEST") != "1",
                    reason="needs a Docker daemon and the step image (.ci/run sets MADMINER_SWEEPER_DOCKER_TEST=1)")
def test_docker_run_alices_and_sally(tmp_path, cache_dir):
    image = os.environ.get("MADMINER_SWEEPER_IMAGE", "madminer-sweeper:latest")
    data = _toy_copy(cache_dir, tmp_path / WEIRD)  # staged into the workflow dir, which the containers see
    secret = "Zq9-stays-in-the-environment"
    proc = _workflow(tmp_path, cache_dir, "--docker", "--image", image, "--data", str(data),
                     "--methods", "alices,sally", *TINY_FILE, f"+vars.api_token={secret}",
                     f"+vars.store=postgresql://alice:{secret}@db.example/events", timeout=1800)
    assert proc.returncode == 0, proc.out[-6000:]
    # secrets reach the containers as environment variables (docker run -e NAME), never yadage's files or logs
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert secret not in proc.out
    _no_side_effects(tmp_path, Path.cwd())
    out = tmp_path / "wf" / "comparing"
    with open(out / "comparison.csv") as f:
        assert {row["method"] for row in csv.DictReader(f)} == {"alices", "sally"}
    assert _pixels_of(out / "limits_by_method.png", (31, 119, 180)) > 150
    # the runner served the store from the workflow dir: every step's run nests under the parent there
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'wf' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("madminer-sweeper").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "workflow")
    assert parent.info.status == "FINISHED"
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 6
    evaluated = next(r for r in runs if r.info.run_name == "evaluate-alices")
    assert evaluated.data.params["vars.store"] == "postgresql://***@db.example/events"  # the value arrived
