"""The fast training path vs MadMiner's Trainer, side by side in one process.

Trains the same ALICES estimator (50x50 tanh network, MadMiner's defaults otherwise, n_workers=0)
on the same toy samples with both trainers and prints training samples/s and their ratio: on CPU at
batch 128 and 1024, and on CUDA (when torch sees it) at 1024, 8192 and 65536 with the samples tiled
to --gpu-samples. Each figure is the median of --repeat runs, the two trainers alternating, per wall
second and per CPU second of the process (the steadier figure on a shared machine).

    python bench/trainer.py [--samples 20000] [--epochs 3] [--threads 1] [--repeat 3]
    python bench/trainer.py --agreement 10     # final validation losses of both trainers over seeds

--compile (with a GPU): the fast trainer's plain loop and its CUDA-graph loop (``training.compile=true``,
app.ml.graphs) side by side at each GPU batch size: the loop rates, their ratio, and whether both gave the same
losses, epoch by epoch (goal, issue 20: >= 100 M samples/s at batch 65536 on an H200).

--agreement N trains alices, sally and nde with both trainers for seeds 0..N-1 (the data of
tests/test_fasttrain.py) and prints, per method, the largest |fast - madminer| of the best validation
loss next to the seed-to-seed spread: the tolerance of the test comes from these numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path


def ratio_samples(path, n, seed=1):
    import numpy as np
    from madminer import sampling
    from madminer.sampling import SampleAugmenter

    np.random.seed(seed)
    x, theta0, _, y, r_xz, t_xz, _ = SampleAugmenter(str(path)).sample_train_ratio(
        theta0=sampling.random_morphing_points(20, [("flat", -10, 10), ("flat", -10, 10)]),
        theta1=sampling.benchmark("sm"),
        n_samples=n,
    )
    return dict(x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz)


@contextlib.contextmanager
def cuda_hidden(hide: bool):
    """MadMiner's Trainer uses CUDA whenever torch sees it: hide it for the CPU rows."""
    import torch

    original = torch.cuda.is_available
    if hide:
        torch.cuda.is_available = lambda: False
    try:
        yield
    finally:
        torch.cuda.is_available = original


def time_one(trainer, data, device, batch_size, epochs, seed=0, compile=False):
    """(training samples per wall second, per CPU second of this process, the loop rate of :func:`_loop_rate`,
    the (train, validation) losses per epoch)."""
    import numpy as np
    import torch
    from madminer.ml import ParameterizedRatioEstimator

    from app.ml import fasttrain, madminer_patches

    np.random.seed(seed)
    torch.manual_seed(seed)
    estimator = ParameterizedRatioEstimator(n_hidden=(50, 50))
    kwargs = dict(method="alices", n_epochs=epochs, batch_size=batch_size, n_workers=0, verbose="none", **data)
    if compile:
        kwargs["compile"] = True
    reports = []  # when each epoch was reported: through MadMiner's per-epoch report, as the train stage sees it
    with cuda_hidden(device == "cpu"), madminer_patches.epoch_reports(lambda *_: reports.append(time.perf_counter())):
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        losses = fasttrain.fit(estimator, trainer, device, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    n_train = len(data["x"]) - int(0.25 * len(data["x"]))
    n_samples = n_train * epochs
    return n_samples / seconds, n_samples / cpu_seconds, _loop_rate(trainer, reports, n_train), losses


def _loop_rate(trainer, reports: list[float], n_train: int):
    """The fast trainer's steady loop: training samples per second between its first and last epoch report (epochs
    2+: the batches, the validation loss and the per-epoch bookkeeping, with the data already on the device; no
    preparation or copies). None for MadMiner's trainer or a single epoch."""
    if trainer != "fast" or len(reports) < 2:
        return None
    return n_train * (len(reports) - 1) / (reports[-1] - reports[0])


def throughput(args, data, device, batches, epochs, madminer_data=None):
    """madminer_data: a smaller tiling for MadMiner's trainer (its rate is per-sample collation, the same at any
    size; on a GPU it would otherwise spend most of the check's minutes on 10^6 samples per run)."""
    rows = []
    for batch_size in batches:
        rates = {"madminer": [], "fast": []}
        for _ in range(args.repeat):
            for trainer in rates:
                use = madminer_data if trainer == "madminer" and madminer_data is not None else data
                rates[trainer].append(time_one(trainer, use, device, batch_size, epochs))
        for i, per in enumerate(("wall s", "CPU s")):
            mm = statistics.median(r[i] for r in rates["madminer"])
            fast = statistics.median(r[i] for r in rates["fast"])
            rows.append((device, batch_size, per, mm, fast))
            print(f"{device:<5} batch {batch_size:>6d}  per {per:<6}  madminer {mm:>12,.0f}/s  fast {fast:>12,.0f}/s  "
                  f"{fast / mm:6.1f}x", flush=True)  # fmt: skip
        loops = [r[2] for r in rates["fast"] if r[2] is not None]
        if loops:
            print(f"{device:<5} batch {batch_size:>6d}  fast trainer's loop between epoch reports (epochs 2+, data on "
                  f"the device): {statistics.median(loops):>14,.0f} samples/s", flush=True)  # fmt: skip
    return rows


def compiled(data, batches, epochs, repeat):
    """The fast trainer's plain loop vs its CUDA-graph loop on CUDA: loop rates and whether the losses are equal."""
    import numpy as np

    goal = 100e6
    for batch_size in batches:
        rates = {False: [], True: []}
        losses = {}
        for _ in range(repeat):
            for graph in rates:
                _, _, loop, losses[graph] = time_one("fast", data, "cuda", batch_size, epochs, compile=graph)
                rates[graph].append(loop or float("nan"))
        plain, graph = statistics.median(rates[False]), statistics.median(rates[True])
        same = all(np.array_equal(a, b) for a, b in zip(losses[False], losses[True]))
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(losses[False], losses[True]))
        met = "" if batch_size != 65536 else f"  goal >= {goal / 1e6:.0f} M/s: {'met' if graph >= goal else 'NOT met'}"
        print(f"cuda  batch {batch_size:>6d}  loop: plain {plain:>14,.0f}/s  cuda graph {graph:>14,.0f}/s  "
              f"{graph / plain:6.1f}x  losses {'identical' if same else f'differ (max {worst:.3g})'}{met}", flush=True)


def agreement(args, path):
    import numpy as np
    import torch

    from app.ml import fasttrain

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_fasttrain import SETTINGS, samples  # the data and settings the test uses

    for method in ("alices", "sally", "nde"):
        losses = {"madminer": [], "fast": []}
        data = samples(path, method)
        for seed in range(args.agreement):
            for trainer in losses:
                np.random.seed(seed)
                torch.manual_seed(seed)
                estimator = SETTINGS[method]["estimator"]()
                _, val = fasttrain.fit(estimator, trainer, "cpu", **SETTINGS[method]["train"], **data)
                losses[trainer].append(float(np.min(val.astype(float))))
        mm, fast = np.array(losses["madminer"]), np.array(losses["fast"])
        diff = np.abs(fast - mm)
        worst = 100 * np.max(diff / np.abs(mm))
        print(f"{method:<7} madminer {mm.mean():.4f} ± {mm.std():.4f} (seeds)   "
              f"fast {fast.mean():.4f} ± {fast.std():.4f}   "
              f"|fast - madminer| max {diff.max():.4f} ({worst:.2f} %), mean {diff.mean():.4f}",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu-batches", type=int, nargs="*", default=[128, 1024])
    parser.add_argument("--gpu-batches", type=int, nargs="*", default=[1024, 8192, 65536])
    parser.add_argument("--gpu-samples", type=int, default=1_000_000)
    parser.add_argument("--gpu-epochs", type=int, default=2)
    parser.add_argument("--gpu-madminer-samples", type=int, default=200_000,
                        help="MadMiner's trainer on this many of the tiled GPU samples (its rate is per-sample)")
    parser.add_argument("--lr-scaling", action="store_true", help="GPU: validation loss vs batch size and lr")
    parser.add_argument("--agreement", type=int, default=0, metavar="N_SEEDS")
    parser.add_argument("--compile", action="store_true", help="GPU: the CUDA-graph loop (training.compile) too")
    args = parser.parse_args()
    logging.getLogger("madminer").setLevel(logging.ERROR)

    import numpy as np
    import torch

    from app.toy import simulator

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())  # first optimizer imports torch._dynamo (seconds)
    with tempfile.TemporaryDirectory() as tmp:
        path = simulator.ensure_toy_file(simulator.ToySettings(n_events=20000), tmp)
        if args.agreement:
            agreement(args, path)
            return
        data = ratio_samples(path, args.samples)
        print(f"ALICES, 50x50 tanh, {len(data['x'])} samples (75 % trained), {args.epochs} epochs, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)  # fmt: skip
        time_one("madminer", data, "cpu", 128, 1)  # warm-up
        time_one("fast", data, "cpu", 128, 1)
        throughput(args, data, "cpu", args.cpu_batches, args.epochs)
        if not torch.cuda.is_available():
            print("cuda  not available: no GPU rows")
            return
        print(f"GPU: {torch.cuda.get_device_name(0)}; samples tiled to {args.gpu_samples}", flush=True)
        reps = -(-args.gpu_samples // len(data["x"]))
        big = {k: np.tile(v, (reps,) + (1,) * (v.ndim - 1))[: args.gpu_samples] for k, v in data.items()}
        small = {k: v[: args.gpu_madminer_samples] for k, v in big.items()}
        print(f"MadMiner's trainer on the first {len(small['x'])} of them", flush=True)
        time_one("fast", big, "cuda", 65536, 1)  # warm-up (CUDA context, kernels)
        time_one("madminer", data, "cuda", 1024, 1)
        throughput(args, big, "cuda", args.gpu_batches, args.gpu_epochs, madminer_data=small)
        if args.compile:
            compiled(big, args.gpu_batches, max(args.gpu_epochs, 3), args.repeat)
        if args.lr_scaling:
            lr_scaling(big, args.gpu_epochs)


def lr_scaling(data, epochs):
    """Validation loss after the same epochs at batch 1024 and 65536, with MadMiner's default learning rates
    (1e-3 -> 1e-4) and with them scaled by sqrt(64) = 8 and by 64 (linear): 64x larger batches take 64x fewer
    steps per epoch, so the unscaled rate trains less per epoch."""
    import numpy as np
    import torch
    from madminer.ml import ParameterizedRatioEstimator

    from app.ml import fasttrain

    print(f"learning-rate scaling, fast trainer on cuda, {epochs} epochs: best validation loss", flush=True)
    for batch_size, scale in ((1024, 1), (65536, 1), (65536, 8), (65536, 64)):
        np.random.seed(0)
        torch.manual_seed(0)
        estimator = ParameterizedRatioEstimator(n_hidden=(50, 50))
        start = time.perf_counter()
        _, val = fasttrain.fit(estimator, "fast", "cuda", method="alices", n_epochs=epochs, batch_size=batch_size,
                               initial_lr=1e-3 * scale, final_lr=1e-4 * scale, n_workers=0, verbose="none", **data)
        torch.cuda.synchronize()
        print(f"cuda  batch {batch_size:>6d}  lr {1e-3 * scale:.0e} -> {1e-4 * scale:.0e}  "
              f"val_loss {float(np.min(val.astype(float))):.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
