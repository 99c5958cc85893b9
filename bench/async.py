"""Trials that never wait for each other against Optuna's batches, side by side in one run.

    python bench/async.py [--trials 12] [--min-epochs 5] [--max-epochs 60] [--samples 20000] [--batch-size 16]

The same search twice on the toy, training only (``stage=train``: the trials' lengths are their training): 12 trials
whose ``training.n_epochs`` runs from 5 to 60 (``hydra/sweeper/sampler=grid``: each length once), two at a time
under ``hydra/launcher=joblib`` on 2 cores:

- batched: ``hydra.sweeper.n_jobs=2`` (a batch waits for its longer trial);
- asynchronous: the same with ``hydra.sweeper.asynchronous=true`` (a trial starts as soon as one ends).

Each search gets its own stage cache (the toy file shared), so neither reuses the other's models. Prints both walls
and the share of each wall during which both cores train (from the jobs' "stage train done" log lines), and exits
non-zero unless the asynchronous wall is <= 0.85x the batched (issue 20). The grid's order is Optuna's draw: the
batched wall depends on which lengths share a batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_DONE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[app\]\[INFO\] - stage train\s+done in\s+([\d.]+) s", re.M)
GOAL = 0.85


def _stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def search(work: Path, toy: Path, name: str, args: argparse.Namespace, asynchronous: bool) -> dict:
    cache = work / f"cache-{name}"
    cache.mkdir()
    (cache / "toy").symlink_to(toy, target_is_directory=True)
    step = max(1, (args.max_epochs - args.min_epochs) // max(1, args.trials - 1))
    cmd = [sys.executable, "-m", "app", "-m", "hydra/sweeper=tolerant_optuna", "training=alices", "stage=train",
           "tracking=disabled",
           "hydra/sweeper/sampler=grid", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "hydra.sweeper.n_jobs=2", f"hydra.sweeper.asynchronous={str(asynchronous).lower()}",
           f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.storage=null",
           f"training.n_epochs=range({args.min_epochs},{args.min_epochs + step * (args.trials - 1)},{step})",
           "training.early_stopping=false", f"training.batch_size={args.batch_size}",
           f"sampling.n_samples={args.samples}", f"hydra.sweep.dir={work}/{name}"]
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")
    start_at, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    intervals = []
    for log in (work / name).glob("*/*.log"):
        for stamp, seconds in TRAIN_DONE.findall(log.read_text()):
            end = _stamp(stamp)
            intervals.append((end - float(seconds), end))
    if len(intervals) != args.trials:
        sys.exit(f"{name}: found {len(intervals)} trainings in the jobs' logs, expected {args.trials}")
    return {"wall": wall, "both": _both(intervals, start_at, start_at + wall) / wall}


def _both(intervals: list[tuple[float, float]], begin: float, end: float) -> float:
    """Seconds of [begin, end] during which at least two of the intervals overlap."""
    events = sorted([(max(a, begin), 1) for a, _ in intervals] + [(min(b, end), -1) for _, b in intervals])
    running, last, both = 0, begin, 0.0
    for t, change in events:
        if running >= 2:
            both += t - last
        running += change
        last = t
    return both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--min-epochs", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--samples", type=int, default=20000, help="sampling.n_samples")
    parser.add_argument("--batch-size", type=int, default=16, help="training.batch_size (an epoch of ~0.8 s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        work = Path(tmp)
        warm = work / "cache-toy"
        env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(warm))
        subprocess.run([sys.executable, "-m", "app", "stage=sample", "tracking=disabled", "sampling.n_samples=100",
                        f"hydra.run.dir={work}/toy-run"], cwd=work, env=env, check=True, capture_output=True)
        batched = search(work, warm / "toy", "batched", args, asynchronous=False)
        asynchronous = search(work, warm / "toy", "async", args, asynchronous=True)
    ratio = asynchronous["wall"] / batched["wall"]
    ok = ratio <= GOAL
    print(f"async bench: {args.trials} trials of {args.min_epochs}-{args.max_epochs} epochs, 2 at a time: batched "
          f"{batched['wall']:.1f} s (both cores train {batched['both']:.0%}), "
          f"asynchronous {asynchronous['wall']:.1f} s "
          f"(both cores train {asynchronous['both']:.0%}); async/batched = {ratio:.2f} (goal <= {GOAL}): "
          f"{'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
