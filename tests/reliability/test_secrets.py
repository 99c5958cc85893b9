"""Secrets given in config or overrides never reach MLflow (params, tags, artifacts, the stored
database), the logs or the console: grep everything a run wrote and everything MLflow stored.

Hydra's own record of the command line (``.hydra/`` in each run dir, ``multirun.yaml``) is the one
place that keeps what was typed, like the shell history; ``${oc.env:VAR}`` keeps it out of there too
(docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from app.tracking import redaction

SECRET = "Zq7-not-for-mlflow"
ENV_SECRET = "Zq8-from-the-environment"


def _secret_overrides() -> list[str]:
    return [
        f"+vars.api_token={SECRET}1",
        f"+vars.db_password={SECRET}2",
        f"+vars.ssh_key={SECRET}3",
        f"+vars.client_secret={SECRET}4",
        f"+vars.store=postgresql://alice:{SECRET}5@db.example/events",
        f"+vars.nested={{token: {SECRET}6}}",
        "+vars.env_token=${oc.env:SWEEPER_TEST_TOKEN}",
    ]


def _run(tmp_path: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), SWEEPER_TEST_TOKEN=ENV_SECRET,
               PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "app", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _leaks(roots: list[Path], texts: dict[str, str]) -> list[str]:
    """Files under ``roots`` (Hydra's own records aside) and named texts that contain a secret."""
    found = [name for name, text in texts.items() if SECRET in text or ENV_SECRET in text]
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or ".hydra" in path.parts or path.name == "multirun.yaml":
                continue
            data = path.read_bytes()
            if SECRET.encode() in data or ENV_SECRET.encode() in data:
                found.append(str(path))
    return found


def _hydra_records(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (".hydra" in p.parts or p.name == "multirun.yaml")]


def _mlflow_texts(uri: str) -> tuple[dict[str, str], list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("madminer-sweeper")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    texts = {}
    for run in runs:
        texts[f"{run.info.run_id} params"] = repr(run.data.params)
        texts[f"{run.info.run_id} tags"] = repr(run.data.tags)
    return texts, runs


def test_secret_keys_and_uri_credentials_are_redacted():
    assert redaction.redact({"ssh_key": "a", "key": "b", "keys": [1], "monkey": 2, "exclude_keys": []}) == {
        "ssh_key": "***", "key": "***", "keys": [1], "monkey": 2, "exclude_keys": []}
    line = r"#0 : +vars.ssh_key=abc monkey=3 tracking.uri=postgresql\://bob\:pw@db:5432/x Storage: http://u:p@h/"
    assert redaction.redact_text(line) == (
        r"#0 : +vars.ssh_key=*** monkey=3 tracking.uri=postgresql\://***@db:5432/x Storage: http://***@h/"
    )


def test_log_records_are_redacted_whatever_the_handlers(caplog):
    redaction.redact_log_records()
    redaction.redact_log_records()  # once per process, however often called
    with caplog.at_level(logging.INFO, logger="app.test"):
        logging.getLogger("app.test").info("Storage: %s, %s", "postgresql://bob:pw@db/x", "api_token=abc")
    assert caplog.records[0].getMessage() == "Storage: postgresql://***@db/x, api_token=***"
    # a bad format string stays logging's to report when it emits, not an error where it is logged
    record = logging.getLogRecordFactory()("app.test", logging.INFO, __file__, 1, "bad %d", ("x",), None)
    assert record.msg == "bad %d"


@pytest.mark.slow
def test_secrets_in_overrides_reach_no_param_tag_artifact_log_or_database(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = _run(tmp_path, cache_dir, *TINY, "evaluation.fisher.enabled=false", "tracking=local",
                f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/run", *_secret_overrides())
    texts, runs = _mlflow_texts(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    # the keys are there, their values are not
    assert params["vars.api_token"] == params["vars.ssh_key"] == params["vars.env_token"] == "***"
    assert params["vars.store"] == "postgresql://***@db.example/events" and params["vars.nested.token"] == "***"
    artifacts = {p.relative_to(tmp_path / "mlruns").parts[-2:] for p in (tmp_path / "mlruns").rglob("*.yaml")}
    assert {("hydra", "config.yaml"), ("hydra", "overrides.yaml"), ("hydra", "hydra.yaml")} <= artifacts
    texts.update(stdout=proc.stdout, stderr=proc.stderr)
    # everything the run wrote (log, run.json, results, model), the sqlite db and the artifact store
    assert not _leaks([tmp_path], texts)
    # ${oc.env:VAR} keeps the value out of Hydra's own records as well
    records = _hydra_records(tmp_path / "run")
    assert records and not any(ENV_SECRET.encode() in p.read_bytes() for p in records)


@pytest.fixture
def postgres_dbs(postgres_db):
    """Two fresh PostgreSQL databases (MLflow's and Optuna's) on 127.0.0.1:5432; dropped afterwards."""
    return [postgres_db(f"secrets_{kind}").rsplit("/", 1)[1] for kind in ("mlflow", "optuna")]


def _database_text(name: str) -> str:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name) as conn:
        cur = conn.cursor()
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        tables = [row[0] for row in cur.fetchall()]
        rows = []
        for table in tables:
            cur.execute(f'SELECT * FROM "{table}"')
            rows += [repr(r) for r in cur.fetchall()]
    assert tables and rows
    return "\n".join(rows)


@pytest.mark.slow
def test_credentials_in_tracking_and_optuna_uris_of_a_search(tmp_path, cache_dir, postgres_dbs):
    """user:password@ in tracking.uri and hydra.sweeper.storage (a trusting local PostgreSQL ignores the
    password), plus secret overrides, through an Optuna search with a parent run and two trials."""
    mlflow_db, optuna_db = postgres_dbs
    uri = f"postgresql://postgres:{SECRET}7@127.0.0.1:5432/{mlflow_db}"
    proc = _run(tmp_path, cache_dir, "-m", "hparams_search=alices_optuna", "hydra.sweeper.n_trials=2", *TINY,
                "evaluation.fisher.enabled=false", "tracking=local", f"tracking.uri={uri}",
                f"hydra.sweeper.storage=postgresql://postgres:{SECRET}8@127.0.0.1:5432/{optuna_db}",
                f"hydra.sweep.dir={tmp_path}/sweep", *_secret_overrides())
    texts, runs = _mlflow_texts(uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert "postgresql://***@127.0.0.1" in proc.stdout  # the Optuna sweeper's "Storage:" line, redacted
    texts.update(stdout=proc.stdout, stderr=proc.stderr, mlflow_database=_database_text(mlflow_db))
    # sweep dir (job logs, .mlflow_parent.json, results), ./mlruns artifacts, MLflow's database
    assert not _leaks([tmp_path], texts)


# ---------------------------------------------------------------------------- the Yadage workflow
def test_workflow_moves_secrets_into_the_environment(monkeypatch):
    from app.errors import UserError
    from app.workflow import params, secrets, steps

    for name in [n for n in os.environ if n.startswith(secrets.SECRET_ENV)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MY_TOKEN", "x")
    overrides = [f"+vars.api_token={SECRET}1", f"+vars.nested={{token: {SECRET}6}}", "training.alpha=2",
                 f"+vars.store='postgresql://alice:{SECRET}5@db/x'", "+vars.env_token=${oc.env:MY_TOKEN}",
                 "~evaluation.theta_true"]
    uri = f"postgresql://bob:{SECRET}7@127.0.0.1/x"
    safe, safe_uri, names = secrets.protect_secrets(overrides, uri)
    assert SECRET not in repr(safe) + safe_uri
    assert safe == ["+vars.api_token='${oc.env:MADMINER_SWEEPER_SECRET_1}'",
                    "+vars.nested='${oc.decode:${oc.env:MADMINER_SWEEPER_SECRET_2}}'", "training.alpha=2",
                    "+vars.store='${oc.env:MADMINER_SWEEPER_SECRET_3}'", "+vars.env_token=${oc.env:MY_TOKEN}",
                    "~evaluation.theta_true"]
    assert safe_uri == "${oc.env:MADMINER_SWEEPER_SECRET_TRACKING_URI}" and params.expand(safe_uri) == uri
    assert names == ["MADMINER_SWEEPER_SECRET_1", "MADMINER_SWEEPER_SECRET_2", "MADMINER_SWEEPER_SECRET_3",
                     "MY_TOKEN", "MADMINER_SWEEPER_SECRET_TRACKING_URI"]
    assert os.environ["MADMINER_SWEEPER_SECRET_3"] == f"postgresql://alice:{SECRET}5@db/x"  # Hydra's quotes off
    # the steps get the tracking URI as the reference; a path or name that looks like one stays a literal
    spec = {"tracking": {"uri": safe_uri, "experiment": "${oc.env:HOME}"}}
    assert steps.tracking_args(spec) == ["tracking.uri='${oc.env:MADMINER_SWEEPER_SECRET_TRACKING_URI}'",
                                             "tracking.experiment_name='\\${oc.env:HOME}'"]
    with pytest.raises(UserError, match="NOT_SET_ANYWHERE, which is not set"):
        params.expand("${oc.env:NOT_SET_ANYWHERE}")


@pytest.mark.slow
def test_secrets_stay_out_of_the_yadage_workflow(tmp_path, cache_dir, postgres_db):
    """Secret overrides and a tracking URI with a password, through the workflow in local processes: nothing
    yadage keeps (inputs, state, step logs), no step's files (Hydra's records included), no MLflow param, tag or
    database row holds them. The training step fails (a stale model dir), so the failure path (error tags on
    the step's run and the parent, the runner's report) is searched too, and the test stays short."""
    from conftest import REPO

    db = postgres_db("secrets_workflow").rsplit("/", 1)[1]
    uri = f"postgresql://postgres:{SECRET}7@127.0.0.1:5432/{db}"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache_dir), SWEEPER_TEST_TOKEN=ENV_SECRET,
               PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                              os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "app.workflow", "run", "--workdir", str(tmp_path / "wf"), "--tracking-uri", uri,
           "--methods", "alices", *TINY, "training.model_dir=/nonexistent/model", *_secret_overrides()]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-6000:]
    # the failing step: one line from the runner, its run and the parent FAILED with the reason, no later step
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step training (alices) failed: training.model_dir=/nonexistent/model cannot be "
                           "trusted"), last
    texts, runs = _mlflow_texts(uri)
    status = {r.info.run_name: r.info.status for r in runs}
    parent = next(r for r in runs if r.data.tags.get("kind") == "workflow")
    assert parent.info.status == "FAILED" and parent.data.tags["failed_step"] == "training (alices)"
    assert "training.model_dir=/nonexistent/model cannot be trusted" in parent.data.tags["error"]
    assert {k: v for k, v in status.items() if k != parent.info.run_name} == {
        "sample-alices": "FINISHED", "train-alices": "FAILED"}, status
    assert not (tmp_path / "wf" / "evaluating_0").exists()
    sampled = status and [r for r in runs if r.info.run_name == "sample-alices"][0].data.params
    # the values did reach the steps (the redacted URI keeps its host; the dict was decoded back to one)
    assert sampled["vars.store"] == "postgresql://***@db.example/events" and sampled["vars.nested.token"] == "***"
    assert (tmp_path / "wf" / "_yadage").is_dir() and list((tmp_path / "wf").rglob("*.log"))
    texts.update(stdout=proc.stdout, stderr=proc.stderr, mlflow_database=_database_text(db))
    leaks = _leaks([tmp_path], texts) + [str(p) for p in _hydra_records(tmp_path / "wf")
                                         if SECRET.encode() in p.read_bytes() or ENV_SECRET.encode() in p.read_bytes()]
    assert not leaks, [(k, v[max(0, v.find("Zq") - 300):v.find("Zq") + 50]) for k, v in texts.items() if k in leaks][:2]
