"""Why training.n_workers defaults to 0: MadMiner's DataLoader workers on small samples, side by side.

Trains the same ALICES estimator on the same toy samples with n_workers = 0, 2 and 8 (MadMiner's
default) in one process and prints the wall times and their ratios to n_workers = 0.

    python bench/n_workers.py [--samples 2000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    args = parser.parse_args()
    logging.getLogger("madminer").setLevel(logging.WARNING)

    import numpy as np
    import torch
    from madminer import sampling
    from madminer.ml import ParameterizedRatioEstimator
    from madminer.sampling import SampleAugmenter

    from app.toy import simulator

    with tempfile.TemporaryDirectory() as tmp:
        path = simulator.ensure_toy_file(simulator.ToySettings(n_events=20000), tmp)
        np.random.seed(1)
        x, theta0, _, y, r_xz, t_xz, _ = SampleAugmenter(str(path)).sample_train_ratio(
            theta0=sampling.random_morphing_points(20, [("flat", -10, 10), ("flat", -10, 10)]),
            theta1=sampling.benchmark("sm"),
            n_samples=args.samples,
        )
        times = {}
        for n_workers in args.workers:
            torch.manual_seed(0)
            estimator = ParameterizedRatioEstimator(n_hidden=(50, 50))
            start = time.perf_counter()
            estimator.train(method="alices", x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz, n_epochs=args.epochs,
                            n_workers=n_workers, verbose="none")
            times[n_workers] = time.perf_counter() - start
    base = times[args.workers[0]]
    print(f"ALICES, {len(x)} samples, {args.epochs} epochs, {torch.get_num_threads()} torch threads")
    for n_workers, seconds in times.items():
        ratio = seconds / base
        print(f"n_workers={n_workers:<2d} {seconds:7.2f} s   {ratio:5.1f}x the time of n_workers={args.workers[0]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
