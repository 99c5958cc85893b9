"""What a job's MLflow calls cost the job's process, measured side by side (sqlite store; ratios printed).

1. Forwarding a ~150-key resolved config: batched (the callback's way) vs one log_param per key (goal: batched >= 5x
   faster and <= 0.5 s per run).
2. A job's calls (run, params, tags at its start; metrics, artifacts, end at its end), each way in a fresh process,
   as the process that runs the jobs pays them: made there synchronously (``tracking.background=false``), made there
   with MLflow's asynchronous logging (``log_batch(..., synchronous=False)``), or submitted to the MLflow helper
   process (``app.tracking.helper``, the default). The first two also pay importing MLflow and opening the store.
3. With --quickstart: `python -m app +experiment=quickstart` with and without tracking.

    python bench/tracking_params.py [--runs 5] [--jobs 8] [--quickstart]
"""

from __future__ import annotations

import argparse
import json
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
    from app.tracking.backend import flatten

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=seed_workflow"])
    tree = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "paths"]), resolve=True,
                                  enum_to_str=True)
    extra = n_keys - len(flatten(tree))
    tree["bench"] = {f"key_{i}": i * 0.5 for i in range(max(extra, 0))}
    return tree


def batched_vs_per_key(runs: int) -> None:
    from mlflow.tracking import MlflowClient

    from app.tracking import backend

    params = backend.flatten(backend.redact(config_tree()))
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        experiment = backend.ensure_experiment(uri, "bench")
        client = MlflowClient(uri)
        batched, per_key = [], []
        for _ in range(runs):
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
    print(f"params per run: {len(params)} (sqlite store, median of {runs} runs)")
    print(f"batched log_batch : {b:.3f} s per run")
    print(f"one log_param/key : {p:.3f} s per run")
    verdict = "met" if p / b >= 5 and b <= 0.5 else "NOT met"
    print(f"speed-up          : {p / b:.1f}x   (goal >= 5x and batched <= 0.5 s: {verdict})")


# ----------------------------------------------------------------------------------------------- a job's calls
def _job_dir(root: Path, i: int) -> Path:
    out = root / f"job{i}"
    (out / "results").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    metrics = {f"metric_{k}": k * 0.1 for k in range(30)}
    metrics["loss_history"] = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e} for e in range(1, 21)]
    (out / "results" / "metrics.json").write_text(json.dumps(metrics))
    for k in range(5):
        (out / "results" / f"array_{k}.json").write_text("x" * 10000)
    return out


def one_mode(mode: str, jobs: int, workdir: Path) -> dict:
    """In a fresh process: ``jobs`` jobs' calls made ``mode``'s way; the seconds the caller spent."""
    params = {f"p.{k}": str(k) for k in range(100)}
    tags = {f"t.{k}": str(k) for k in range(30)}
    uri = f"sqlite:///{workdir}/{mode}.db"
    start = time.perf_counter()
    if mode == "helper":
        from app.tracking import calls, helper

        tracker = helper.start(uri, "bench")
    else:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        from app.tracking import backend

        experiment = backend.ensure_experiment(uri, "bench")
        client, sync = MlflowClient(uri), mode == "sync"
    opened = time.perf_counter() - start
    starts, ends = [], []
    for i in range(jobs):
        out = _job_dir(workdir / mode, i)
        t0 = time.perf_counter()
        if mode == "helper":
            handle = calls.new_handle()
            tracker.submit(calls.start_job, handle=handle, uri=uri, experiment_name="bench", run_name=f"job-{i}",
                           params=params, tags=tags, output_dir=str(out), start_time=int(time.time() * 1000))
        else:
            run_id = client.create_run(experiment, run_name=f"job-{i}").info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], synchronous=sync)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=sync)
        t1 = time.perf_counter()
        if mode == "helper":
            tracker.submit(calls.finish_job, handle=handle, status="FINISHED", error=None, register_model=False,
                           end_time=int(time.time() * 1000))
        else:
            metrics = json.loads((out / "results" / "metrics.json").read_text())
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, 0) for k, v in metrics.items() if isinstance(v, float)]
            batch += [Metric(f"epoch_{k}", v, now, e["epoch"]) for e in metrics["loss_history"] for k, v in e.items()
                      if k != "epoch"]
            client.log_batch(run_id, metrics=batch, synchronous=sync)
            client.log_artifacts(run_id, str(out / "results"), "results")
            client.set_terminated(run_id, "FINISHED")
        starts.append(t1 - t0)
        ends.append(time.perf_counter() - t1)
    t2 = time.perf_counter()
    if mode == "helper":
        errors = tracker.wait()
        tracker.close()
        assert not errors, errors
    return {"open": opened, "start": statistics.median(starts), "end": statistics.median(ends),
            "drain": time.perf_counter() - t2, "total": time.perf_counter() - start}


def job_calls(jobs: int) -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(("sync", "async", "helper", "sync", "async", "helper")):  # twice, interleaved
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--jobs", str(jobs), "--workdir",
                                  str(workdir)], capture_output=True, text=True, check=True)
            rows.setdefault(mode, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"a job's MLflow calls, as the process running {jobs} jobs pays them (fresh process each, sqlite store; "
          "median per job; two runs each, interleaved):")
    for mode, label in (("sync", "in the job's process, synchronous"), ("async", "in the job's process, MLflow async"),
                        ("helper", "submitted to the MLflow helper")):
        cells = [f"import+open {r['open']:.2f} s, start {r['start']:.3f} s, end {r['end']:.3f} s, "
                 f"then waits {r['drain']:.2f} s" for r in rows[mode]]
        print(f"  {label:36s} " + " | ".join(cells))
    per_job = {m: statistics.mean(r["start"] + r["end"] for r in rows[m]) for m in rows}
    print(f"  per job (start + end): sync {per_job['sync']:.3f} s, async {per_job['async']:.3f} s, helper "
          f"{per_job['helper']:.4f} s: async/sync = {per_job['async'] / per_job['sync']:.1f}x, sync/helper = "
          f"{per_job['sync'] / per_job['helper']:.0f}x")


def quickstart() -> None:
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
    print(f"tracking share of a quickstart run: {100 * share:.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--quickstart", action="store_true")
    parser.add_argument("--one", choices=["sync", "async", "helper"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_mode(args.one, args.jobs, Path(args.workdir))))
        return
    batched_vs_per_key(args.runs)
    job_calls(args.jobs)
    if args.quickstart:
        quickstart()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
