"""Start-up and exit cost: ``python -m app --help`` and ``--cfg job`` against a bare Hydra app with one option,
and the end of a process that has done a job's imports.

Runs each command --runs times, the apps alternating, and prints the median wall and CPU (user +
system) times and the ratios app / bare (goal: <= 2x). On a shared machine the CPU times are the
steadier figure. The bare app is written to a temporary folder: one YAML option,
``@hydra.main`` and a print.

``exit``: a process imports what a job imports (app.sweep.warm_imports) and ends with the interpreter's ordinary
exit, against the same process ending through ``app.main.exit_now`` (atexit handlers, flush, ``os._exit``),
alternating. ``--run`` adds the default run (``python -m app cache.enabled=false tracking=local``) with
``MADMINER_SWEEPER_FULL_EXIT=1`` (the ordinary exit) against without.

    python bench/startup.py [--runs 5] [--run]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BARE = '''import hydra


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    print(cfg)


if __name__ == "__main__":
    main()
'''


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


IMPORTS = "from app.sweep import warm_imports; warm_imports(True)"


def side_by_side(label: str, commands: dict[str, tuple[list[str], dict]], cwd: Path, runs: int) -> None:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, (cmd, env) in commands.items():
            times[name].append(timed(cmd, cwd, env))
    (a, b) = commands
    for i, what in enumerate(("wall", "CPU")):
        first = statistics.median(t[i] for t in times[a])
        second = statistics.median(t[i] for t in times[b])
        print(f"{label:<10} {what:<4} {a} {first:6.2f} s   {b} {second:6.2f} s   saved {first - second:5.2f} s "
              f"(median of {runs})", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--run", action="store_true", help="also the default run, ordinary exit vs exit_now")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bare.py").write_text(BARE)
        (tmp / "config.yaml").write_text("option: 1\n")
        apps = {"app": [sys.executable, "-m", "app"], "bare": [sys.executable, str(tmp / "bare.py")]}
        for flags in (["--help"], ["--cfg", "job"]):
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
            for _ in range(args.runs):
                for name, cmd in apps.items():
                    times[name].append(timed(cmd + flags, tmp, env))
            for i, what in enumerate(("wall", "CPU")):
                app = statistics.median(t[i] for t in times["app"])
                bare = statistics.median(t[i] for t in times["bare"])
                print(f"{' '.join(flags):<10} {what:<4} app {app:6.2f} s   bare Hydra app {bare:6.2f} s   "
                      f"{app / bare:5.2f}x (median of {args.runs})", flush=True)  # fmt: skip
        py = sys.executable
        side_by_side("exit", {
            "ordinary exit": ([py, "-c", IMPORTS], env),
            "exit_now": ([py, "-c", f"{IMPORTS}; from app.main import exit_now; exit_now(0)"], env)}, tmp, args.runs)
        if args.run:
            run = [py, "-m", "app", "cache.enabled=false", "tracking=local", f"hydra.run.dir={tmp}/run"]
            side_by_side("default run", {
                "ordinary exit": (run, dict(env, MADMINER_SWEEPER_FULL_EXIT="1")),
                "exit_now": (run, env)}, tmp, max(1, args.runs // 2))


if __name__ == "__main__":
    main()
