"""What the train stage saves against what it reports: the before/after numbers of issue 19 in docs/toy.md.

    python bench/saved_models.py [--seeds 0 1] [--n-samples 10000]

1. ``training=sally training.trainer=madminer training.n_epochs=30``: the reported ``val_mse_score`` (the saved
   epoch's, ``app.stages.train.saved_epoch``) and the saved model's validation MSE, recomputed from the model loaded
   back from its folder, without the patch ``madminer_patches.best_epoch_kept`` (before) and with it (after).
2. ``training=sally training.n_estimators=N`` (fast trainer): ``val_mse_score`` (after: the ensemble's mean
   prediction), ``val_mse_score_members_mean`` (before: what ``val_mse_score`` was) and the truth: the MSE of the
   saved model's score against the toy's exact score t(x | SM) on the validation samples.

Trains through ``app.stages.train.run`` with the app's config (Hydra's compose API), on CPU, in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from app.main import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="app"):
        cfg = hydra_compose("config", overrides=[*overrides, "tracking=disabled", "training.device=cpu"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n-samples", type=int, default=10000)
    parser.add_argument("--ensembles", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    import numpy as np

    from app.config import register_configs
    from app.domain import datafile
    from app.domain.validate import check_config
    from app.ml import estimators, madminer_patches, validation
    from app.stages import sample, train
    from app.toy.truth import ToyTruth

    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="saved-models-"))
    os.environ.setdefault("MADMINER_SWEEPER_CACHE", str(tmp / "cache"))
    base = compose("training=sally", f"sampling.n_samples={args.n_samples}")
    info = datafile.resolve(base.data, base.paths.cache_dir)
    method = check_config(base, info)
    samples_dir = sample.run(base, method, info, tmp / "samples").samples_dir
    val = train.training_inputs(method, "score", sample.arrays(samples_dir, sample.VAL_FILENAME))
    x_val = np.load(val["x"])
    exact = ToyTruth.from_file(info.path).score(x_val, np.zeros(2))

    def trained(name, *overrides, patched=True):
        cfg = compose("training=sally", f"sampling.n_samples={args.n_samples}", *overrides)
        context = contextlib.nullcontext() if patched else unpatched(madminer_patches)
        with context:
            result = train.run(cfg, method, info, samples_dir, tmp / name)
        model = estimators.load(result.model_dir)
        saved = validation.loss_terms(model, method.name, 1.0, val)["val_mse_score"]
        truth = float(np.mean((estimators.score(model, x_val) - exact) ** 2))
        return result.metrics, saved, truth

    print("1. training=sally training.trainer=madminer training.n_epochs=30")
    for seed in args.seeds:
        for patched in (False, True):
            m, saved, _ = trained(f"mm{seed}{patched}", "training.trainer=madminer", "training.n_epochs=30",
                                  f"seed={seed}", patched=patched)  # fmt: skip
            print(
                f"  seed {seed} {'after ' if patched else 'before'}: reported val_mse_score {m['val_mse_score']:.5f}"
                f" (epoch {m['saved_epoch']} of {m['n_epochs_trained']}), saved model's {saved:.5f}",
                flush=True,
            )
    print("2. training=sally training.n_estimators=N (fast trainer)")
    for seed in args.seeds:
        for n in args.ensembles:
            m, saved, truth = trained(f"ens{seed}{n}", f"training.n_estimators={n}", f"seed={seed}")
            members = m.get("val_mse_score_members_mean", m["val_mse_score"])
            print(
                f"  seed {seed} N={n}: val_mse_score {m['val_mse_score']:.5f} (saved model's {saved:.5f}), "
                f"members' mean {members:.5f}, truth MSE vs exact score {truth:.5f}",
                flush=True,
            )


@contextlib.contextmanager
def unpatched(madminer_patches):
    """MadMiner's own early stopping (before issue 19): best_epoch_kept does nothing."""
    original = madminer_patches.best_epoch_kept
    madminer_patches.best_epoch_kept = contextlib.nullcontext
    try:
        yield
    finally:
        madminer_patches.best_epoch_kept = original


if __name__ == "__main__":
    main()
