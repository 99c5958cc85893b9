"""Scale: a large toy through generate, sample, train and the limits, each stage in its own process.

    python bench/scale.py                      # 10^6 events, 10^5 samples, 5 epochs, 25x25 limits
    python bench/scale.py --events 100000 --samples 10000 --also 0.1   # and the same at a tenth, side by side

Each stage is the command a user runs (``python -m app stage=...`` on the previous stage's output; the
generation is ``app.toy.simulator.ensure_toy_file``); the bench prints its wall time and the peak resident memory
of its process (``ru_maxrss`` from ``wait4``). With ``--also F`` it runs the same chain again with the
event and sample counts scaled by F and prints, per stage, how time and memory grow: a stage whose time
grows faster than the size (exponent > 1.2 over a 10x step) is flagged. Goals (issue 9): each stage
<= 2 min and <= 4 GB peak RSS on 2 cores at 10^6 events / 10^5 samples.

    python bench/scale.py --big-samples 10000000 --big-only   # the 10^7-sample row alone

``--big-samples N`` adds a row: the sample stage at N samples (and N/4 validation samples) on the same toy, then
one epoch of training on them (batch ``--big-batch``): the fast trainer reads them memory-mapped and batches them
in disk order (``app.ml.streaming``). Goal (issue 20): the training's peak RSS under 2 GB at 10^7 samples.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS, GOAL_GB = 120.0, 4.0
BIG_TRAIN_GB = 2.0  # the 10^7-sample training's peak RSS


def measure(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, output) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, usage.ru_maxrss / 1024**2, out  # ru_maxrss is in kB on Linux


def chain(work: Path, events: int, samples: int, epochs: int, resolution: int, seed: int) -> dict[str, tuple]:
    cache = work / "cache"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")
    data = [f"data.n_events={events}", f"data.seed={seed}"]
    common = [*data, "tracking=disabled", "cache.enabled=false", f"seed={seed}", f"sampling.n_samples={samples}"]
    app = [sys.executable, "-m", "app"]
    results = {}
    generate = ("from app.toy import simulator as toy; import sys; "
                f"print(toy.ensure_toy_file(toy.ToySettings(n_events={events}, seed={seed}), sys.argv[1]))")
    results["generate"] = measure([sys.executable, "-c", generate, str(cache)], env, work)
    results["sample"] = measure([*app, "stage=sample", *common, f"hydra.run.dir={work}/sample"], env, work)
    train = [f"training.n_epochs={epochs}"]
    results["train"] = measure([*app, "stage=train", *common, *train, f"sampling.samples_dir={work}/sample/samples",
                                f"hydra.run.dir={work}/train"], env, work)
    results["limits"] = measure([*app, "stage=evaluate", *common, *train, f"training.model_dir={work}/train/model",
                                 f"evaluation.grid.resolutions={resolution}", f"hydra.run.dir={work}/evaluate"],
                                env, work)
    return results


def big(work: Path, events: int, samples: int, batch: int, seed: int) -> dict[str, tuple]:
    """The sample stage at ``samples`` and one epoch of training on them, each in its own process."""
    cache = work / "cache"
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")
    common = [f"data.n_events={events}", f"data.seed={seed}", "tracking=disabled", "cache.enabled=false",
              f"seed={seed}", f"sampling.n_samples={samples}"]
    app = [sys.executable, "-m", "app"]
    results = {"sample": measure([*app, "stage=sample", *common, f"hydra.run.dir={work}/sample"], env, work)}
    train = ["training.n_epochs=1", f"training.batch_size={batch}", f"sampling.samples_dir={work}/sample/samples"]
    results["train"] = measure([*app, "stage=train", *common, *train, f"hydra.run.dir={work}/train"], env, work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=25)
    parser.add_argument("--also", type=float, default=None, help="also run at this fraction of the sizes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--big-samples", type=int, default=0, help="also: sample this many, train 1 epoch on them")
    parser.add_argument("--big-batch", type=int, default=4096)
    parser.add_argument("--big-only", action="store_true", help="only the --big-samples row")
    args = parser.parse_args()
    sizes = [(args.events, args.samples)]
    if args.also:
        sizes.insert(0, (int(args.events * args.also), int(args.samples * args.also)))
    runs = []
    for events, samples in [] if args.big_only else sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            print(f"running: {events} events, {samples} samples, {args.epochs} epochs, "
                  f"{args.resolution}x{args.resolution} grid", flush=True)
            runs.append(((events, samples), chain(Path(tmp), events, samples, args.epochs, args.resolution,
                                                  args.seed)))
    if args.big_samples:
        with tempfile.TemporaryDirectory(prefix="bench-scale-big-") as tmp:
            print(f"running: {args.events} events, {args.big_samples} samples, 1 epoch at batch {args.big_batch}",
                  flush=True)
            found = big(Path(tmp), args.events, args.big_samples, args.big_batch, args.seed)
        print(f"\n{'stage':<9} {'events':>9} {'samples':>8} {'wall s':>8} {'peak GB':>8}")
        for stage, (wall, rss, out) in found.items():
            met = "met" if rss <= BIG_TRAIN_GB else "NOT met"
            goal = f"  goal <= {BIG_TRAIN_GB:.0f} GB: {met}" if stage == "train" else ""
            print(f"{stage:<9} {args.events:>9} {args.big_samples:>8} {wall:>8.1f} {rss:>8.2f}{goal}")
            for line in out.splitlines():
                if "stage " in line and " done in " in line or "memory-mapped" in line:
                    print(f"          {line.split(' - ', 1)[-1]}")
    if not runs:
        return
    print(f"\n{'stage':<9} {'events':>9} {'samples':>8} {'wall s':>8} {'peak GB':>8}  goal (<= {GOAL_SECONDS:.0f} s, "
          f"<= {GOAL_GB:.0f} GB)")
    for (events, samples), results in runs:
        for stage, (wall, rss, _) in results.items():
            ok = "met" if wall <= GOAL_SECONDS and rss <= GOAL_GB else "NOT met"
            print(f"{stage:<9} {events:>9} {samples:>8} {wall:>8.1f} {rss:>8.2f}  {ok}")
    if len(runs) == 2:
        (small, r0), (large, r1) = runs
        print(f"\ngrowth from {small} to {large} (events, samples): time and memory exponents")
        for stage in r0:
            size = (large[0] / small[0]) if stage == "generate" else (large[1] / small[1])
            if stage == "limits":
                size = large[1] / small[1]  # the test and Asimov sets follow the sample counts
            t_exp = math.log(r1[stage][0] / r0[stage][0]) / math.log(size)
            m_exp = math.log(r1[stage][1] / r0[stage][1]) / math.log(size)
            flag = "  <- worse than linear" if t_exp > 1.2 else ""
            print(f"{stage:<9} time x{r1[stage][0] / r0[stage][0]:6.2f} (exponent {t_exp:5.2f}), "
                  f"memory x{r1[stage][1] / r0[stage][1]:5.2f} (exponent {m_exp:5.2f}){flag}")


if __name__ == "__main__":
    main()
