"""Start-up cost: ``python -m app --help`` and ``--cfg job`` against a bare Hydra app with one option.

Runs each command --runs times, the apps alternating, and prints the median wall and CPU (user + system)
times and the ratios app / bare (goal: <= 2x, by design: Hydra deep-copies the ConfigStore once per config
group that ``--help`` lists, so the app registers only what its YAML options need, app.config). On a shared
machine the CPU times are the steadier figure. The bare app is written to a temporary folder: one YAML
option, ``@hydra.main`` and a print; it runs with the same PYTHONPATH (the same Hydra plugins).

``--against SRC`` adds the app of another checkout (its ``src`` folder, e.g. the commit before a change),
measured in the same alternation, for a side-by-side before/after.

    python bench/startup.py [--runs 5] [--against ../main/src]
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


def with_src(src: Path) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--against", type=Path, help="the src folder of another checkout, measured side by side")
    args = parser.parse_args()
    env = with_src(REPO / "src")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bare.py").write_text(BARE)
        (tmp / "config.yaml").write_text("option: 1\n")
        apps = {"app": ([sys.executable, "-m", "app"], env)}
        if args.against:
            apps["against"] = ([sys.executable, "-m", "app"], with_src(args.against.resolve()))
        apps["bare"] = ([sys.executable, str(tmp / "bare.py")], env)
        for flags in (["--help"], ["--cfg", "job"]):
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
            for _ in range(args.runs):
                for name, (cmd, app_env) in apps.items():
                    times[name].append(timed(cmd + flags, tmp, app_env))
            for i, what in enumerate(("wall", "CPU")):
                median = {name: statistics.median(t[i] for t in runs) for name, runs in times.items()}
                line = (f"{' '.join(flags):<10} {what:<4} app {median['app']:6.2f} s   bare Hydra app "
                        f"{median['bare']:6.2f} s   {median['app'] / median['bare']:5.2f}x")
                if "against" in median:
                    line += (f"   | against {median['against']:6.2f} s ({median['against'] / median['bare']:5.2f}x "
                             f"bare; app/against {median['app'] / median['against']:5.2f}x)")
                print(f"{line} (median of {args.runs})", flush=True)


if __name__ == "__main__":
    main()
