"""The seed scenario: the project against a baseline that does the same work the way the seed workflow does.

Project: ``python -m app -m +experiment=seed_workflow training=alice,alices,sally data=file
data.path=FILE`` (local MLflow tracking, as a user runs it). Baseline: the madminer-workflow-ml steps,
one Python process per step as its step scripts run them, with MadMiner's default estimator settings
(``n_workers=8``) and the experiment's sizes: sample (ratio and local samples), train x3, evaluate x3
(rate, histo, ml / sally limits with and without the cross section on the 25x25 grid, Fisher
information), plot. Prints the wall time of every step / stage and the ratio.

    python bench/seed_scenario.py [--data ../shared/data/madminer_physics_sample.h5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "madminer_physics_sample.h5"
METHODS = ("alice", "alices", "sally")
# the seed workflow's settings (conf/experiment/seed_workflow.yaml)
RATIO = dict(n_hidden=(100, 100, 100), batch_size=100, n_epochs=2, validation_split=0.3, alpha=10.0)
SALLY = dict(n_hidden=(100,), batch_size=128, n_epochs=50, validation_split=0.25)
GRID = dict(grid_ranges=[(-20.0, 20.0), (-20.0, 20.0)], grid_resolutions=[25, 25], luminosity=10000.0)


# --------------------------------------------------------------------------- baseline steps (own processes)
def step_sample(data: str, work: Path) -> None:
    import numpy as np
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    augmenter = SampleAugmenter(data)
    prior = random_morphing_points(20, [("gaussian", 0.0, 1.0), ("gaussian", 0.0, 1.0)])
    x, theta0, theta1, y, r_xz, t_xz, _ = augmenter.sample_train_ratio(
        theta0=prior, theta1=benchmark("sm"), n_samples=1000, test_split=0.5
    )
    for name, value in dict(x=x, theta0=theta0, y=y, r_xz=r_xz, t_xz=t_xz).items():
        np.save(work / f"ratio_{name}.npy", value)
    x, _, t_xz, _ = augmenter.sample_train_local(theta=benchmark("sm"), n_samples=1000, test_split=0.5)
    np.save(work / "local_x.npy", x)
    np.save(work / "local_t_xz.npy", t_xz)


def step_train(method: str, work: Path) -> None:
    from madminer.ml import ParameterizedRatioEstimator, ScoreEstimator

    if method == "sally":
        estimator = ScoreEstimator(n_hidden=SALLY["n_hidden"])
        estimator.train(method="sally", x=str(work / "local_x.npy"), t_xz=str(work / "local_t_xz.npy"),
                        **{k: v for k, v in SALLY.items() if k != "n_hidden"})  # fmt: skip
    else:
        estimator = ParameterizedRatioEstimator(n_hidden=RATIO["n_hidden"])
        inputs = dict(x="x", y="y", theta="theta0", r_xz="r_xz", t_xz="t_xz")
        estimator.train(method=method, **{k: str(work / f"ratio_{v}.npy") for k, v in inputs.items()},
                        **{k: v for k, v in RATIO.items() if k != "n_hidden"})  # fmt: skip
    estimator.save(str(work / f"model_{method}"))


def step_evaluate(method: str, data: str, work: Path) -> None:
    import numpy as np
    from madminer.fisherinformation import FisherInformation
    from madminer.limits import AsymptoticLimits

    from app.ml import madminer_patches

    # MadMiner 0.9.6 runs on NumPy >= 1.24 only with the np.histogramdd(normed=...) keyword shim; none of the
    # project's other patches (reused bin search, events read once, batched limits) is applied here
    madminer_patches.apply_numpy_shim()
    limits = AsymptoticLimits(data)
    model = str(work / f"model_{method}")
    own = "sally" if method == "sally" else "ml"
    results = {}
    for mode in ("rate", "histo", own):
        for include_xsec in (True, False) if mode != "rate" else (True,):
            kwargs = dict(mode=mode, theta_true=np.zeros(2), include_xsec=include_xsec, test_split=0.5, **GRID)
            if mode == "histo":  # the project's settings: histograms of the test events, no toys
                kwargs.update(hist_vars=["pt_j1"], n_histo_toys=None, n_binning_toys=None)
            elif mode == "sally":
                kwargs.update(model_file=model, n_histo_toys=None, n_binning_toys=None)
            elif mode == "ml":
                kwargs["model_file"] = model
            _, p_values, *_ = limits.expected_limits(**kwargs)
            results[f"{mode}_{include_xsec}"] = p_values
    fisher = FisherInformation(data)
    results["fisher_rate"] = fisher.rate_information(np.zeros(2), luminosity=10000.0)[0]
    results["fisher_histo"] = fisher.histo_information(
        np.zeros(2), luminosity=10000.0, observable="pt_j1", bins=np.array([30.0, 100.0, 200.0, 400.0])
    )[0]
    if method == "sally":
        results["fisher_full"] = fisher.full_information(
            np.zeros(2), model, luminosity=10000.0, include_xsec_info=True, test_split=0.5
        )[0]
    np.savez(work / f"results_{method}.npz", **results)


def step_plot(work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axis = np.linspace(-20, 20, 25)
    for method in METHODS:
        results = np.load(work / f"results_{method}.npz")
        fig, ax = plt.subplots(figsize=(5, 5))
        for i, key in enumerate(k for k in results.files if not k.startswith("fisher")):
            ax.contour(axis, axis, results[key].reshape(25, 25).T, levels=[0.32], colors=f"C{i}")
        fig.savefig(work / f"limits_{method}.png")
        plt.close(fig)


# --------------------------------------------------------------------------- the two sides
def run_timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed, see {log}:\n{log.read_text()[-3000:]}")
    return seconds


def baseline(data: Path, work: Path, env: dict) -> dict[str, float]:
    me = [sys.executable, str(Path(__file__).resolve()), "step"]
    steps = [("sample", ["sample", str(data)])]
    steps += [(f"train {m}", ["train", m]) for m in METHODS]
    steps += [(f"evaluate {m}", ["evaluate", m, str(data)]) for m in METHODS]
    steps += [("plot", ["plot"])]
    times = {}
    for name, args in steps:
        times[name] = run_timed(me + args + ["--work", str(work)], work, env, work / f"{name.replace(' ', '_')}.log")
        print(f"baseline {name:<16} {times[name]:7.1f} s", flush=True)
    return times


def project(data: Path, work: Path, env: dict) -> tuple[float, dict[str, float]]:
    cmd = [sys.executable, "-m", "app", "-m", "+experiment=seed_workflow", "training=alice,alices,sally",
           "data=file", f"data.path={data}"]  # fmt: skip
    total = run_timed(cmd, work, env, work / "project.log")
    stages: dict[str, float] = {}
    for stage, seconds in re.findall(r"stage (\w+)\s+done in\s+([\d.]+) s", (work / "project.log").read_text()):
        stages[stage] = stages.get(stage, 0.0) + float(seconds)  # the console log holds every job's lines
    return total, stages


# what one job of the project imports (app.pipeline's stages): the floor of any single-process run
JOB_IMPORTS = ("app.main", "torch", "madminer.sampling", "madminer.ml", "madminer.limits", "madminer.fisherinformation",
               "matplotlib.pyplot")


def import_floor(env: dict, repeats: int = 3) -> float:
    """Median wall time of a fresh process that only imports what a job needs (no config, no data, no work)."""
    code = f"import importlib\nfor m in {JOB_IMPORTS!r}: importlib.import_module(m)"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "step":
        parser = argparse.ArgumentParser()
        parser.add_argument("step")
        parser.add_argument("name")
        parser.add_argument("args", nargs="*")
        parser.add_argument("--work", type=Path, required=True)
        a = parser.parse_args(sys.argv[1:])
        sys.path.insert(0, str(REPO / "src"))
        {"sample": lambda: step_sample(a.args[0], a.work), "train": lambda: step_train(a.args[0], a.work),
         "evaluate": lambda: step_evaluate(a.args[0], a.args[1], a.work),
         "plot": lambda: step_plot(a.work)}[a.name]()  # fmt: skip
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data} not found; pass --data PATH to a MadMiner event file")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "project").mkdir()
        total, stages = project(args.data.resolve(), tmp / "project", env)
        print(f"project  total {total:7.1f} s   stages summed over the 3 jobs: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()), flush=True)  # fmt: skip
        if args.skip_baseline:
            return
        (tmp / "baseline").mkdir()
        times = baseline(args.data.resolve(), tmp / "baseline", env)
        base = sum(times.values())
        print(f"baseline total {base:7.1f} s   project {total:.1f} s   {base / total:.1f}x")
        floor = import_floor(env)
        print(f"floor: a process that only imports what a job needs takes {floor:.1f} s (median of 3); a 10x result "
              f"needs the whole project run within {base / 10:.1f} s, leaving {base / 10 - floor:.1f} s for Hydra, "
              f"the 3 jobs' stages and MLflow (they take {total - floor:.1f} s here)")
        print(json.dumps({"project": total, "project_stages": stages, "baseline": times, "import_floor": floor}))


if __name__ == "__main__":
    main()
