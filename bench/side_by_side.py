"""This checkout against another one (the commit before a change), measured side by side in one run.

    git worktree add ../before <commit>
    python bench/side_by_side.py --against ../before/src [--runs 3] [--only default,seed,sweep,joblib]

Each command runs ``--runs`` times, the two checkouts alternating (before, after, before, ...), each run in a fresh
folder with a fresh stage cache (the toy file made once per checkout, outside the measurements, as a user has it);
the median wall times and the ratio after/before are printed. The commands:

- ``default``: ``python -m app cache.enabled=false``: the README's main job on the toy, tracked in a local sqlite
  store (created by the run, as on a first run);
- ``seed``: the seed scenario's project side (``bench/seed_scenario.py``): ``+experiment=seed_workflow`` with
  alice, alices and sally on the physics sample (needs ../shared);
- ``sweep``: ``bench/sweeps.py``'s cold 8-trial grid (``training.alpha``, 1.6-s trials: fixed costs dominate);
- ``joblib``: the same grid with ``hydra/launcher=joblib hydra.launcher.n_jobs=2``.

``bench/startup.py --against`` does the same for ``--help`` and ``--cfg job`` (against a bare Hydra app too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seed_scenario import DEFAULT_DATA as PHYSICS  # bench/ is the script's folder, first on sys.path
from seed_scenario import project
from startup import with_src

REPO = Path(__file__).resolve().parents[1]
ALPHAS = ",".join(str(2**i) for i in range(8))
COMMANDS = {
    "default": ["cache.enabled=false", "hydra.run.dir={work}/run"],
    "seed": None,  # seed_scenario.project: the seed scenario's command, as bench/seed_scenario.py times it
    "sweep": ["-m", f"training.alpha={ALPHAS}", "tracking=local", "evaluation.grid.resolutions=15",
              "hydra.sweep.dir={work}/sweep"],
    "joblib": ["-m", f"training.alpha={ALPHAS}", "tracking=local", "evaluation.grid.resolutions=15",
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir={work}/sweep"],
}


def environment(src: Path, cache: Path) -> dict[str, str]:
    return dict(with_src(src), MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")


def timed(args: list[str] | None, work: Path, env: dict[str, str]) -> float:
    work.mkdir(parents=True)
    if args is None:
        return project(PHYSICS, work, env)[0]
    cmd = [sys.executable, "-m", "app", *(a.replace("{work}", str(work)) for a in args)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} (PYTHONPATH={env['PYTHONPATH']}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, required=True, help="the src folder of the checkout before")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(COMMANDS), help="a comma-separated subset of " + ",".join(COMMANDS))
    args = parser.parse_args()
    trees = {"before": args.against.resolve(), "after": REPO / "src"}
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(COMMANDS)
    if unknown:
        parser.error(f"unknown command(s) {sorted(unknown)}; choose from {', '.join(COMMANDS)}")
    if "seed" in names and not PHYSICS.exists():
        print(f"seed: skipped ({PHYSICS} not found)")
        names.remove("seed")
    with tempfile.TemporaryDirectory(prefix="bench-side-") as tmp:
        tmp = Path(tmp)
        for tree, src in trees.items():  # each checkout's toy file, made once
            timed(["stage=sample", "tracking=disabled", "hydra.run.dir={work}/run"], tmp / tree / "toy",
                  environment(src, tmp / tree / "toycache"))

        def cache(tree: str, label: str) -> Path:
            path = tmp / tree / "caches" / label
            path.mkdir(parents=True)
            (path / "toy").symlink_to(tmp / tree / "toycache" / "toy")
            return path

        print(f"{os.cpu_count()} cores; before: {trees['before']}; after: {trees['after']}; {args.runs} runs each, "
              "alternating; median wall seconds", flush=True)
        for name in names:
            times: dict[str, list[float]] = {tree: [] for tree in trees}
            for i in range(args.runs):
                for tree, src in trees.items():
                    label = f"{name}-{i}"
                    times[tree].append(timed(COMMANDS[name], tmp / tree / "runs" / label,
                                             environment(src, cache(tree, label))))
            before, after = (statistics.median(times[tree]) for tree in trees)
            runs = "; ".join(f"{tree} " + ", ".join(f"{t:.1f}" for t in times[tree]) for tree in trees)
            print(f"{name:<8} before {before:6.1f} s   after {after:6.1f} s   after/before {after / before:5.2f}x"
                  f"   ({runs})", flush=True)


if __name__ == "__main__":
    main()
