"""An MLflow server's start with and without MLflow 3's job runner, side by side in one run.

    python bench/mlflow_server.py [--runs 3] [--settle 10]

Starts ``mlflow server`` on a fresh sqlite store, alternately with the default environment and with
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (what the test fixtures and the container workflow's server use), and
prints for each: seconds until its port accepts, its processes and the CPU seconds they used ``--settle`` s after
that; medians over ``--runs``, and the ratios off/on.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(job_runner: bool, folder: str, settle: float) -> tuple[float, int, float]:
    import psutil

    env = dict(os.environ)
    if not job_runner:
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    port = free_port()
    begin = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder}/m-{port}.db", "--workers", "1"],
                              env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("mlflow server did not start")
                time.sleep(0.1)
        up = time.perf_counter() - begin
        time.sleep(settle)
        procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        cpu = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return up, len(procs), cpu
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    rows: dict[bool, list[tuple[float, int, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-server-") as folder:
        for _ in range(args.runs):
            for job_runner in (True, False):  # alternating
                rows[job_runner].append(start(job_runner, folder, args.settle))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
    for job_runner, (up, n, cpu) in med.items():
        print(f"job runner {'on ' if job_runner else 'off'}: up in {up:.1f} s, {n:.0f} processes, "
              f"{cpu:.1f} s CPU {args.settle:.0f} s later")
    print(f"off/on: start {med[False][0] / med[True][0]:.2f}, CPU {med[False][2] / med[True][2]:.2f} "
          f"(medians of {args.runs})")


if __name__ == "__main__":
    main()
