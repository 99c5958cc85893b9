"""Shared helpers: run the real CLI in a subprocess, with a per-session toy cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHYSICS_FILE = REPO.parent / "shared" / "data" / "madminer_physics_sample.h5"

# Small but real: every end-to-end test adds these unless it says otherwise.
TINY = [
    "sampling.n_samples=600",
    "training.n_epochs=2",
    "training.n_hidden=[16,16]",
    "evaluation.grid.resolutions=5",
    "evaluation.n_test_samples=100",
    "evaluation.fisher.bins=4",
    "data.n_events=4000",
]


def share_the_cores() -> None:
    """pytest-xdist workers split the cores as the joblib launcher's jobs do (``app.ml.device.share_cores``): each
    worker, and every process its tests start, gets cores // workers intra-op threads. With every torch and BLAS
    using all cores, a waiting thread spins while the other worker's threads hold the cores: 13 trainer comparisons
    took 110 CPU-s on two workers instead of 26 (docs/performance.md, "The test suite's time")."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        from app.ml import device

        device.share_cores(workers)


share_the_cores()  # at import, before any test module imports torch or NumPy


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Shared by the whole session: the generated toy files (and the stage cache of tests that use it)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def test_cache(tmp_path, cache_dir) -> Path:
    """A stage cache of this test alone (no test reuses another test's samples or models), sharing the toys."""
    own = tmp_path / "cache"
    own.mkdir(exist_ok=True)
    (cache_dir / "toy").mkdir(exist_ok=True)
    if not (own / "toy").exists():
        (own / "toy").symlink_to(cache_dir / "toy", target_is_directory=True)
    return own


@pytest.fixture
def run_app(tmp_path, test_cache):
    """Run the CLI ``python -m app ARGS`` in ``tmp_path``: in this process by default (``app.main.main`` with those
    arguments, as the console script calls it: Hydra's real command line, callbacks, exit codes and output, without
    paying the interpreter's start and the imports of torch and MadMiner again), or as a real process with
    ``process=True`` where only a process shows it (signals, what a fresh process imports, its environment).
    Returns a CompletedProcess-like result (``returncode``, ``stdout``, ``stderr``, ``out`` = both).

    The stage cache is per test (``test_cache``): runs of one test may reuse each other's stages.
    """

    def run(*args: str, check: bool = True, tracking: str = "disabled", run_dir: Path | None = None, timeout=600,
            process: bool = False, env: dict | None = None):
        argv = list(args)
        if tracking and not any(a.startswith("tracking=") for a in args):
            argv.append(f"tracking={tracking}")
        if not any(a.startswith("hydra.run.dir") or a in ("-m", "--multirun") for a in args) and "--cfg" not in args:
            argv.append(f"hydra.run.dir={run_dir or tmp_path / 'run'}")
        environ = {"MADMINER_SWEEPER_CACHE": str(test_cache), "PYTHONUNBUFFERED": "1", **(env or {})}
        if process:
            cmd = [sys.executable, "-m", "app", *argv]
            proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, **environ), capture_output=True, text=True,
                                  timeout=timeout)
        else:
            proc = run_in_process(argv, cwd=tmp_path, env=environ)
        proc.out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"python -m app {' '.join(argv)} exited {proc.returncode}:\n{proc.out[-4000:]}")
        return proc

    return run


def run_in_process(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m app ARGV`` as ``app.main.main()`` in this process: ``sys.argv``, the working directory and the
    environment set for the call and restored afterwards, stdout and stderr captured, the exit code taken from the
    ``SystemExit`` that ends every Hydra command (as the interpreter would: None is 0, a message is printed and 1)."""
    import contextlib
    import io
    import logging

    from app.main import main

    saved_argv, saved_cwd = sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level  # pytest's own (caplog) among them
    saved_env = {k: os.environ.get(k) for k in env}
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    try:
        sys.argv = ["app", *argv]
        os.chdir(cwd)
        os.environ.update(env)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as done:
                code = done.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            stderr.write(f"{code}\n")
            code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for handler in root.handlers[:]:  # Hydra's job logging (the run's log file and console) replaced them
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)
    return subprocess.CompletedProcess(["app", *argv], code, stdout.getvalue(), stderr.getvalue())


def compose_job(*overrides: str, run_dir: Path):
    """What ``python -m app OVERRIDES`` composes (Hydra's compose API), set as the job's Hydra config with its output
    dir at ``run_dir``; returns the job's config (without its ``hydra`` node), ready for ``app.pipeline.run``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from app.config import register_configs
    from app.main import config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="app"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose_app(tmp_path, test_cache, monkeypatch):
    """Compose the app's config in this process, as ``python -m app ARGS`` would (:func:`compose_job`), and set it as
    the job's Hydra config; returns the job's config (without its ``hydra`` node), ready for ``app.pipeline.run``.

    The stage cache is this test's own (``test_cache``); tracking is off unless a ``tracking=...`` override is given
    (the MLflow callback is not a part of ``pipeline.run``: a test that needs it runs the CLI)."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("MADMINER_SWEEPER_CACHE", str(test_cache))

    def make(*overrides: str, run_dir: Path | None = None):
        args = list(overrides)
        if not any(a.startswith("tracking=") for a in args):
            args.append("tracking=disabled")
        return compose_job(*args, run_dir=run_dir or tmp_path / "run")

    yield make
    HydraConfig.instance().cfg = None  # the next test composes its own


@pytest.fixture
def physics_file() -> Path:
    if not PHYSICS_FILE.exists():
        pytest.skip(f"{PHYSICS_FILE} not available (needs ../shared beside the checkout)")
    return PHYSICS_FILE


SERVICE_FIXTURES = {"postgres_db", "mlflow_server"}  # PostgreSQL at 127.0.0.1:5432, a real `mlflow server`
# The slow tier's longest tests (30-90 s each on 2 cores, `--durations`), started first: pytest-xdist hands tests out
# in collection order, and one of these started last kept one worker busy for a minute after the other had ended.
LONGEST_FIRST = (
    "test_yadage.py::test_local_run", "test_server_faults.py::test_eight", "test_secrets.py::test_secrets_stay_out",
    "test_faults.py::test_ctrl_c", "test_slurm.py::test_slurm_tasks", "test_correctness.py::test_mlproject",
    "test_sweeps.py::test_two_sweep_processes", "test_faults.py::test_kill_9",
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection
def pytest_collection_modifyitems(items):
    """The tiers (README, Tests): a test that needs PostgreSQL or an MLflow server is in the ``services`` tier,
    whichever fixture brings it; ``slow`` and ``docker`` are marked where the test is. The longest tests first."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
    items.sort(key=lambda item: next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid),
                                     len(LONGEST_FIRST)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_db():
    """A fresh PostgreSQL database at 127.0.0.1:5432 (trust auth); yields its URL, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as err:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {err}")
    admin.autocommit = True
    created = []

    def make(prefix: str = "test") -> str:
        db = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin.cursor().execute(f"CREATE DATABASE {db}")
        created.append(db)
        return f"postgresql://postgres@127.0.0.1:5432/{db}"

    try:
        yield make
    finally:
        for db in created:
            admin.cursor().execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()


# Test servers only record runs: without MLflow's job runner (eight more processes and ~25 s of CPU at each start).
def server_env() -> dict:
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # the environment at the server's start


@pytest.fixture
def mlflow_server(tmp_path, postgres_db):
    """A real `mlflow server` on 127.0.0.1 with a fresh PostgreSQL database as its backend store."""
    backend = postgres_db("mlflow_test")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), env=server_env(),
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def app_checked_at_exit(check: str) -> str:
    """``python -c`` code that runs ``python -m app ARGS`` and prints the expression ``check`` to stderr at exit
    (app.main.exit_now runs the atexit handlers, then ends the process)."""
    return (
        "import atexit, runpy, sys\n"
        "sys.argv = ['app'] + sys.argv[1:]\n"
        f"atexit.register(lambda: print({check}, file=sys.stderr))\n"
        "runpy.run_module('app', run_name='__main__')\n"
    )
