"""A search with and without ``hydra/sweeper/pruner=median``, side by side in one run.

    python bench/pruning.py [--trials 16] [--epochs 30] [--stage all] [--seeds 3]

The preset ``hparams_search=alices_optuna`` (TPE, sampler seed 1, objective ``val_improved_xe``) on the toy, twice
with the same sampler seed: without a pruner, then with ``hydra/sweeper/pruner=median`` (2 startup trials, 5
warm-up epochs: ``PRUNER``). Each search gets its own stage cache (the toy file shared) and its own study, so
neither reuses the other's models. The seed-to-seed spread is measured on the unpruned search's best parameters:
the same trial retrained with ``--seeds`` other training seeds (``seed=43,44,...``); the spread is the range of the
objective over those runs and the best one.

Goals (issue 20): the pruned search's best objective within the spread of the unpruned one's (not worse than it by
more than the spread), epochs trained <= 50 %, wall <= 60 %. Prints one line; exits non-zero when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPOCHS_GOAL, WALL_GOAL = 0.50, 0.60
# The median pruner as one would set it for a 16-trial search: 2 trials before it prunes (Optuna's default, 5, leaves
# a third of such a search unprunable), and no pruning in a trial's first 5 epochs.
PRUNER = ["hydra.sweeper.pruner.n_startup_trials=2", "hydra.sweeper.pruner.n_warmup_steps=5"]


def run(cmd: list[str], work: Path, cache: Path) -> float:
    env = dict(os.environ, MADMINER_SWEEPER_CACHE=str(cache), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "app", *cmd], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"python -m app {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def cache_for(work: Path, toy: Path, name: str) -> Path:
    cache = work / f"cache-{name}"
    cache.mkdir()
    (cache / "toy").symlink_to(toy, target_is_directory=True)
    return cache


def search(work: Path, toy: Path, name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    sweep = work / name
    cmd = ["-m", "hparams_search=alices_optuna", f"stage={args.stage}", "tracking=disabled",
           f"training.n_epochs={args.epochs}", "training.early_stopping=false", f"sampling.n_samples={args.samples}",
           f"training.batch_size={args.batch_size}", f"hydra.sweeper.n_trials={args.trials}",
           f"hydra.sweeper.storage=sqlite:///{work}/{name}.db",
           f"hydra.sweep.dir={sweep}", *extra]
    wall = run(cmd, work, cache_for(work, toy, name))
    record = json.loads((sweep / "sweep.json").read_text())
    epochs = 0
    for job in record["jobs"]:
        metrics = json.loads((Path(job["output_dir"]) / "results" / "metrics.json").read_text())
        epochs += int(metrics["n_epochs_trained"])
    finished = [j for j in record["jobs"] if j["status"] == "finished" and j["objective"] is not None]
    best = min(finished, key=lambda j: j["objective"])
    return {"wall": wall, "epochs": epochs, "best": best["objective"], "best_job": best,
            "pruned": sum(j["status"] == "pruned" for j in record["jobs"])}


def spread(work: Path, toy: Path, best: dict, args: argparse.Namespace) -> float:
    """The range of the objective over the best trial's parameters retrained with other training seeds."""
    searched = [o for o in best["overrides"] if o.split("=")[0] in
                ("training.alpha", "training.initial_lr", "training.n_hidden")]
    seeds = ",".join(str(43 + i) for i in range(args.seeds))
    sweep = work / "seeds"
    run(["-m", "training=alices", "stage=train", "tracking=disabled", f"seed={seeds}", *searched,
         f"training.n_epochs={args.epochs}", "training.early_stopping=false", f"sampling.n_samples={args.samples}",
         f"training.batch_size={args.batch_size}", f"hydra.sweep.dir={sweep}"], work, cache_for(work, toy, "seeds"))
    values = [best["objective"]] + [json.loads((sweep / str(i) / "results" / "metrics.json").read_text())
                                    ["val_improved_xe"] for i in range(args.seeds)]
    return max(values) - min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=10000, help="sampling.n_samples")
    parser.add_argument("--stage", default="all", help="all (the preset's search) or train (training only)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for the spread of the best trial")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="training.batch_size: small, so that training (not fixed costs) sets the wall")
    parser.add_argument("--pruner", nargs="*", default=PRUNER,
                        help="the pruned search's settings of the median pruner (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        work = Path(tmp)
        warm = work / "cache-toy"
        run(["stage=sample", "tracking=disabled", "sampling.n_samples=100", f"hydra.run.dir={work}/toy-run"], work,
            warm)
        plain = search(work, warm / "toy", "unpruned", args, [])
        pruned = search(work, warm / "toy", "median", args, ["hydra/sweeper/pruner=median", *args.pruner])
        noise = spread(work, warm / "toy", plain["best_job"], args)
    epochs, wall = pruned["epochs"] / plain["epochs"], pruned["wall"] / plain["wall"]
    close = pruned["best"] <= plain["best"] + noise
    ok = close and epochs <= EPOCHS_GOAL and wall <= WALL_GOAL
    print(f"pruning bench: {args.trials} trials x {args.epochs} epochs; best val_improved_xe {plain['best']:.5f} "
          f"unpruned vs {pruned['best']:.5f} median ({pruned['pruned']} pruned; seed spread {noise:.5f}: "
          f"{'within' if close else 'OUTSIDE'}); epochs {pruned['epochs']}/{plain['epochs']} = {epochs:.0%} "
          f"(goal <= {EPOCHS_GOAL:.0%}); wall {pruned['wall']:.0f}/{plain['wall']:.0f} s = {wall:.0%} "
          f"(goal <= {WALL_GOAL:.0%}): {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
