"""The ``ml`` expected limits: MadMiner's per-grid-point evaluation vs the batched one, side by side.

Trains the default ALICES estimator (the toy's default sizes: 20000 events, 10000 samples, 50x50,
--epochs epochs with the fast trainer), then computes the expected limits on the default 25x25 grid
(half the toy's parameter ranges) with both AsymptoticLimits classes on the same model and prints the
wall times, their ratio and the largest p-value difference.

    python bench/limits.py [--epochs 5] [--resolution 25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("madminer").setLevel(logging.ERROR)

    import numpy as np
    import torch
    from madminer import sampling
    from madminer.limits import AsymptoticLimits
    from madminer.ml import ParameterizedRatioEstimator
    from madminer.sampling import SampleAugmenter

    from app.ml import fasttrain, madminer_patches
    from app.toy import simulator

    with tempfile.TemporaryDirectory() as tmp:
        path = simulator.ensure_toy_file(simulator.ToySettings(n_events=20000), tmp)
        np.random.seed(1)
        torch.manual_seed(1)
        x, theta0, _, y, r_xz, t_xz, _ = SampleAugmenter(str(path)).sample_train_ratio(
            theta0=sampling.random_morphing_points(20, [("flat", -10, 10), ("flat", -10, 10)]),
            theta1=sampling.benchmark("sm"),
            n_samples=10000,
        )
        model = ParameterizedRatioEstimator(n_hidden=(50, 50))
        fasttrain.fit(model, method="alices", x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz, n_epochs=args.epochs,
                      n_workers=0, verbose="none")  # fmt: skip
        kwargs = dict(
            mode="ml", theta_true=np.zeros(2), grid_ranges=[(-10.0, 10.0), (-10.0, 10.0)],
            grid_resolutions=[args.resolution] * 2, luminosity=10000.0, include_xsec=True, model_file="unused",
            test_split=0.2, return_histos=False,
        )  # fmt: skip
        times: dict[str, list[float]] = {"madminer": [], "batched": []}
        p_values = {}
        with mock.patch("madminer.limits.asymptotic_limits.load_estimator", lambda _file: model):
            for _ in range(args.repeat):
                for name, cls in (("madminer", AsymptoticLimits), ("batched", madminer_patches.batched_limits())):
                    limits = cls(str(path))
                    start = time.perf_counter()
                    p_values[name] = limits.expected_limits(**kwargs)[1]
                    times[name].append(time.perf_counter() - start)
    mm, fast = statistics.median(times["madminer"]), statistics.median(times["batched"])
    diff = np.max(np.abs(p_values["batched"] - p_values["madminer"]))
    print(f"ml limits, {args.resolution}x{args.resolution} grid, {torch.get_num_threads()} torch threads: "
          f"MadMiner {mm:.2f} s, batched {fast:.2f} s, {mm / fast:.1f}x; "
          f"max |p batched - p MadMiner| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
