"""What the steps' containers need (``run --docker``): the event file inside the workflow dir, and an MLflow
server on loopback for a local store (containers cannot open the host's sqlite file)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app.errors import UserError


def stage_data(data: str, workdir: Path) -> str:
    """Containers see only the workflow dir: link (or copy) the event file into yadage's init folder."""
    if data == "toy":
        return data
    target = workdir / "init" / Path(data).name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(data, target)
    except OSError:
        shutil.copy2(data, target)
    return str(target)


def serve_mlflow(workdir: Path) -> tuple[subprocess.Popen, str]:
    """An MLflow server for a store in the workflow dir, on a free loopback port: (process, its URI)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination",
            str(workdir / "mlartifacts")]
    log_file = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    # The server only records runs: without MLflow's job runner (eight more processes, ~25 s of CPU at start).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
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
