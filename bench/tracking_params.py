"""Forwarding a ~150-key resolved config to MLflow: batched (the callback's way) vs one log_param per key.

Both variants write into the same sqlite store, side by side, in one process; prints the times and
their ratio (goal: batched >= 5x faster and <= 0.5 s per run). With --quickstart it also runs
`python -m app +experiment=quickstart` with and without tracking and reports the tracking share.

    python bench/tracking_params.py [--runs 5] [--quickstart]
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


def config_tree(n_keys: int = 150) -> dict:
    """A resolved-config-like tree: the real composed config, padded to ~n_keys leaves."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from app.main import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=seed_workflow"])
    tree = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "paths"]), resolve=True,
                                  enum_to_str=True)
    from app.tracking.backend import flatten

    extra = n_keys - len(flatten(tree))
    tree["bench"] = {f"key_{i}": i * 0.5 for i in range(max(extra, 0))}
    return tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quickstart", action="store_true")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from app.tracking import backend

    tree = config_tree()
    params = backend.flatten(backend.redact(tree))
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        experiment = backend.ensure_experiment(uri, "bench")
        client = MlflowClient(uri)
        batched, per_key = [], []
        for _ in range(args.runs):
            run = client.create_run(experiment)
            start = time.perf_counter()
            backend.log_params(client, run.info.run_id, params)
            batched.append(time.perf_counter() - start)
            run = client.create_run(experiment)
            start = time.perf_counter()
            for key, value in params.items():
                client.log_param(run.info.run_id, key, value)
            per_key.append(time.perf_counter() - start)
    b, p = statistics.median(batched), statistics.median(per_key)
    print(f"params per run: {len(params)} (sqlite store, median of {args.runs} runs)")
    print(f"batched log_batch : {b:.3f} s per run")
    print(f"one log_param/key : {p:.3f} s per run")
    verdict = "met" if p / b >= 5 and b <= 0.5 else "NOT met"
    print(f"speed-up          : {p / b:.1f}x   (goal >= 5x and batched <= 0.5 s: {verdict})")

    if args.quickstart:
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as tmp:
            times = {}
            for mode in ("disabled", "local"):
                cmd = [sys.executable, "-m", "app", "+experiment=quickstart", f"tracking={mode}",
                       f"hydra.run.dir={tmp}/{mode}"]
                if mode == "local":
                    cmd.append(f"tracking.uri=sqlite:///{tmp}/q.db")
                subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)  # warm the toy cache
                start = time.perf_counter()
                subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
                times[mode] = time.perf_counter() - start
        share = (times["local"] - times["disabled"]) / times["local"]
        print(f"quickstart wall time: {times['disabled']:.1f} s without tracking, {times['local']:.1f} s with")
        print(f"tracking share of a quickstart run: {100 * share:.0f} % (mostly importing mlflow)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
