"""The Python parts of bench/gpu_check.sh (issue 20), one subcommand each; each exits non-zero when its check fails.

python bench/gpu_checks.py compile-losses OUT     # toy runs OUT/run_fast and OUT/run_compiled: identical losses
python bench/gpu_checks.py stream                 # samples on disk on CUDA give the in-memory losses exactly
python bench/gpu_checks.py slots FOLDER           # concurrent jobs each on their own GPU (with >= 2 GPUs)
python bench/gpu_checks.py sweep-record DB        # a tracked joblib sweep's children: gpu.* tags, system/* metrics
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path


def compile_losses(out: str) -> bool:
    """Every epoch's losses of the toy run with training.compile=true equal those of the plain loop."""
    runs = {}
    for name in ("fast", "compiled"):
        runs[name] = json.loads((Path(out) / f"run_{name}" / "model" / "model.json").read_text())["metrics"]
    same = runs["fast"]["loss_history"] == runs["compiled"]["loss_history"]
    print(
        f"fast vs fast + training.compile=true, every epoch's losses: {'identical' if same else 'DIFFER'} "
        f"(val_loss {runs['fast'].get('val_loss')} vs {runs['compiled'].get('val_loss')})"
    )
    return same


def stream(device: str = "cuda") -> bool:
    """10^6 tiled samples as .npy files: read memory-mapped and copied to the GPU a chunk at a time (stream=True) vs
    loaded (stream=False); with external validation data the two must train identically."""
    import numpy as np
    import torch

    from app.ml import fasttrain  # first: app's import installs the Python 3.12 shim that MadMiner's uproot3 needs
    from app.toy import simulator

    # isort: split
    from madminer.ml import ParameterizedRatioEstimator

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trainer import ratio_samples

    with tempfile.TemporaryDirectory() as tmp:
        data = ratio_samples(simulator.ensure_toy_file(simulator.ToySettings(n_events=20000), tmp), 20000)
        files = {}
        for k, v in data.items():
            np.save(f"{tmp}/{k}.npy", np.tile(v, (50,) + (1,) * (v.ndim - 1)))
            np.save(f"{tmp}/{k}_val.npy", v[:5000])
            files[k], files[f"{k}_val"] = f"{tmp}/{k}.npy", f"{tmp}/{k}_val.npy"
        losses = {}
        for on_disk in (False, True):
            np.random.seed(0)
            torch.manual_seed(0)
            start = time.perf_counter()
            losses[on_disk] = fasttrain.fit(
                ParameterizedRatioEstimator(n_hidden=(50, 50)), "fast", device, method="alices", n_epochs=2,
                batch_size=8192, validation_split=None, verbose="none", stream=on_disk, **files,
            )  # fmt: skip
            print(f"stream={on_disk}: val_loss {losses[on_disk][1].tolist()} ({time.perf_counter() - start:.1f} s)")
    same = all(np.array_equal(a, b) for a, b in zip(losses[False], losses[True]))
    print(f"samples on disk vs in memory on {device}: {'identical' if same else 'DIFFER'}")
    return same


def slots(folder: str) -> bool:
    """n + 1 jobs at once on a node with n GPUs: the first n each on their own, tensors on the job's GPU."""
    import torch

    from app.ml import device

    n = torch.cuda.device_count()
    with ExitStack() as jobs:
        found = []
        for job in range(n + 1):
            found.append(jobs.enter_context(device.job_gpu("cuda", folder, job_num=job)))
            placed = torch.zeros(1, device="cuda").device.index
            r = found[-1]
            print(
                f"job {job}: cuda:{r['index']} ({r['name']}; {r['assigned']}; "
                f"CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}); a new tensor lands on cuda:{placed}"
            )
            if placed != r["index"]:
                return False
    distinct = n == 1 or sorted(r["index"] for r in found[:n]) == list(range(n))
    print(f"{n} GPU(s): {'each job its own' if n > 1 else 'one GPU, nothing to share'}: {distinct}")
    return distinct


def sweep_record(db: str) -> bool:
    """The children of a tracked sweep: the gpu.* tags and MLflow's system/* metrics (GPU ones with pynvml)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    experiment = c.get_experiment_by_name("madminer-sweeper")
    runs = [r for r in c.search_runs([experiment.experiment_id]) if "gpu.index" in r.data.tags]
    for r in runs:
        tags = {k: v for k, v in r.data.tags.items() if k.startswith(("gpu.", "system_metrics"))}
        print(r.info.run_name, tags, sorted(k for k in r.data.metrics if k.startswith("system/")))
    return len(runs) == 2 and all(any(k.startswith("system/cpu") for k in r.data.metrics) for r in runs)


def main() -> None:
    logging.getLogger("madminer").setLevel(logging.ERROR)
    command, *args = sys.argv[1:]
    checks = {"compile-losses": compile_losses, "stream": stream, "slots": slots, "sweep-record": sweep_record}
    sys.exit(0 if checks[command](*args) else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
