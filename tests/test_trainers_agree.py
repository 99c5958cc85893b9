"""The two trainers (``training.trainer=fast`` and ``=madminer``) save equally good models, for every family.

Each test id is one family, trained through the train stage as the app trains it (``app.stages.train.run``: the
validation partition as external validation data, MadMiner's trainer with its patches, ``estimator.save()``), with
both trainers over the seeds SEEDS on the same tiny samples. What is compared is what was *saved*: each model is
loaded back from its folder (``app.ml.estimators.load``) and its validation loss is computed once more by one
function for both trainers (``app.ml.validation.loss_terms``: the networks' raw outputs on the validation samples,
standardised by each estimator's own transforms as in training, and MadMiner's loss functions). That loss is a
proper scoring rule of the estimated log r / score / log p (its expectation is smallest at the exact likelihood), so
equal losses are equally good estimators. Through this path the comparison does not depend on how MadMiner's
``evaluate_*`` methods scale theta for density and double-parameterized estimators.

Three checks per family:

- each trainer's reported ``val_loss`` (``train.saved_epoch``) is the loss of the model it saved (MadMiner's own
  early stopping saved the last epoch while reporting the best: ``madminer_patches.best_epoch_kept``);
- the mean over seeds of the saved models' loss agrees between the trainers within TOLERANCE[family];
- a network that does not learn (learning rate 1e-12, fast trainer) misses that bound: the tolerance can fail.

TOLERANCE: ``python tests/test_trainers_agree.py 8`` trains each family with both trainers over seeds 0-7 and prints
the mean and the seed-to-seed standard deviation of the saved models' loss per trainer, the difference of the means
over SEEDS, and the untrained loss. The tolerance is 3 standard errors of the difference of two means over SEEDS,
3 x std x sqrt(2 / len(SEEDS)), with the larger std of the two trainers, rounded up; the numbers measured are in
TOLERANCE's comments. ``morphing_aware`` trains ALICE (ALICES' score term makes its seed spread as large as what it
learns in 5 epochs: 0.722 +- 0.018 vs untrained 0.733).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SEEDS = (0, 1, 2, 3)
TINY = [
    "data.n_events=4000", "sampling.n_samples=1024", "sampling.n_validation_samples=512", "training.n_epochs=5",
    "training.batch_size=64", "training.initial_lr=0.01", "training.final_lr=0.001", "training.n_hidden=[16,16]",
    "training.n_workers=0", "training.device=cpu",
]  # fmt: skip
FAMILIES = {
    "alice": ["training=alice"],
    "alices": ["training=alices"],
    "carl": ["training=carl"],
    "rolr": ["training=rolr"],
    "rascal": ["training=rascal", "training.n_epochs=10"],
    "cascal": ["training=cascal", "training.n_epochs=10"],
    "sally": ["training=sally"],
    "sallino": ["training=sallino"],
    "nde": ["training=nde", "training.n_mades=1"],
    "scandal": ["training=scandal", "training.n_mades=1"],
    "double_parameterized": ["training=alices", "training.estimator=double_parameterized"],
    "morphing_aware": ["training=alice", "training.estimator=morphing_aware"],
    "ensemble": ["training=alices", "training.n_estimators=2"],
}
# python tests/test_trainers_agree.py 8 (CPU, torch 2.13, under load): the larger seed-to-seed std of the saved
# models' val_loss of the two trainers over seeds 0-7 -> 3 std sqrt(2 / 4), rounded up; |fast - madminer| of the
# means over seeds 0-2 and the untrained loss, for scale. Mean over seeds 0-7 fast / madminer:
TOLERANCE = {
    "alice": 0.0075,  # std 0.0035; 0.6845 / 0.6837, |diff| 0.0017, untrained 0.6997
    "alices": 0.041,  # std 0.0193; 0.9237 / 0.9238, |diff| 0.0006, untrained 1.0040
    "carl": 0.004,  # std 0.0018; 0.6873 / 0.6871, |diff| 0.0008, untrained 0.7032
    "rolr": 0.036,  # std 0.0170; 1.1093 / 1.1060, |diff| 0.0049, untrained 1.1733
    "rascal": 0.15,  # 10 epochs: std 0.0683; 1.2061 / 1.1961, |diff| 0.0045, untrained 1.4776 (*)
    "cascal": 0.05,  # 10 epochs: std 0.0234; 0.8798 / 0.8821, |diff| 0.0132, untrained 1.0076 (*)
    "sally": 0.0028,  # std 0.0013; 0.0551 / 0.0549, |diff| 0.0005, untrained 0.2315
    "sallino": 0.0028,  # the same training as sally (the score at one point; only the limits differ)
    "nde": 0.025,  # std 0.0115; 2.6408 / 2.6425, |diff| 0.0017, untrained 2.7348
    "scandal": 0.095,  # std 0.0445; 3.4924 / 3.4951, |diff| 0.0094, untrained 3.7288
    "double_parameterized": 0.0085,  # std 0.0039; 1.3346 / 1.3341, |diff| 0.0002, untrained 1.3582
    "morphing_aware": 0.0095,  # std 0.0044; 0.6657 / 0.6679, |diff| 0.0009, untrained 0.6952
    "ensemble": 0.033,  # std 0.0153; 0.9171 / 0.9194, |diff| 0.0101, untrained 0.9989
}
# (*) with 5 epochs the score term's seed spread (rascal 0.030, cascal 0.017) was too close to what they learn: on
# the samples of a later sample stage cascal's untrained network (0.961) came within the tolerance of the trained
# ones (0.926). Measured on those samples too (10 epochs): rascal std 0.066, 1.519 vs untrained 1.735; cascal std
# 0.013, 0.858 vs untrained 0.961.


def saved_losses(compose, workdir: Path, overrides: list[str], seeds, trainers=("fast", "madminer")) -> dict:
    """{trainer: [(reported val_loss, the saved model's val_loss), ...] per seed}, plus "untrained": the loss of a
    network trained with a learning rate of 1e-12."""
    from app.domain import datafile
    from app.domain.validate import check_config
    from app.ml import estimators, validation
    from app.stages import sample, train

    cfg = compose(*TINY, *overrides)
    info = datafile.resolve(cfg.data, cfg.paths.cache_dir)
    method = check_config(cfg, info)
    samples_dir = sample.run(cfg, method, info, workdir / "samples").samples_dir
    val_files = sample.arrays(samples_dir, sample.VAL_FILENAME)
    arrays = train.training_inputs(method, cfg.training.estimator, val_files)
    # whole batches (MadMiner's validation loss is a mean of batch means; the fast trainer's the mean over samples)
    n_val = len(np.load(val_files["x"]))
    cfg.training.batch_size = max(d for d in range(1, cfg.training.batch_size + 1) if n_val % d == 0)

    def one(name: str, trainer: str, seed: int, **changes) -> tuple[float, float]:
        run_cfg = cfg.copy()
        run_cfg.seed = seed
        run_cfg.training.trainer = trainer
        for key, value in changes.items():
            run_cfg.training[key] = value
        result = train.run(run_cfg, method, info, samples_dir, workdir / name)
        model = estimators.load(result.model_dir)
        recomputed = validation.loss_terms(model, method.name, cfg.training.alpha, arrays)["val_loss"]
        return float(result.metrics["val_loss"]), float(recomputed)

    out = {t: [one(f"{t}{s}", t, s) for s in seeds] for t in trainers}
    out["untrained"] = one("untrained", "fast", seeds[0], initial_lr=1e-12, final_lr=1e-12)[1]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_both_trainers_save_equally_good_models(compose_app, tmp_path, family):
    losses = saved_losses(compose_app, tmp_path, FAMILIES[family], SEEDS)
    for trainer in ("fast", "madminer"):
        reported, saved = np.array(losses[trainer]).T
        np.testing.assert_allclose(reported, saved, rtol=1e-4, err_msg=f"{trainer}: reported vs saved")
    means = {t: float(np.mean([s for _, s in losses[t]])) for t in ("fast", "madminer")}
    tolerance = TOLERANCE[family]
    assert abs(means["fast"] - means["madminer"]) < tolerance, (losses, means)
    # a network that does not learn is outside the tolerance: the comparison can fail
    assert losses["untrained"] - max(means.values()) > tolerance, (losses["untrained"], means)


def measure(n_seeds: int, families: list[str]) -> None:  # python tests/test_trainers_agree.py [n_seeds [family ..]]
    """Print, per family: each trainer's mean and seed-to-seed std of the saved models' val_loss over seeds 0..n-1,
    |difference of the means| over SEEDS, the untrained loss and the tolerance 3 std sqrt(2 / len(SEEDS))."""
    import os
    import tempfile

    from hydra import compose, initialize_config_dir

    from app.config import register_configs
    from app.main import config_dir

    register_configs()
    os.environ.setdefault("MADMINER_SWEEPER_CACHE", str(Path(tempfile.gettempdir()) / "trainers-agree-cache"))

    def composer(*overrides):
        from omegaconf import open_dict

        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="app"):
            cfg = compose("config", overrides=[*overrides, "tracking=disabled"])
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    for family in families or FAMILIES:
        overrides = FAMILIES[family]
        with tempfile.TemporaryDirectory() as tmp:
            losses = saved_losses(composer, Path(tmp), overrides, tuple(range(n_seeds)))
        saved = {t: np.array([s for _, s in losses[t]]) for t in ("fast", "madminer")}
        worst = max(float(np.max(np.abs(r - s) / np.abs(s))) for t in saved for r, s in [np.array(losses[t]).T])
        spread = max(float(np.std(v, ddof=1)) for v in saved.values())
        diff = abs(float(saved["fast"][: len(SEEDS)].mean() - saved["madminer"][: len(SEEDS)].mean()))
        print(f"{family:22s} fast {saved['fast'].mean():.4f} +- {np.std(saved['fast'], ddof=1):.4f}  madminer "
              f"{saved['madminer'].mean():.4f} +- {np.std(saved['madminer'], ddof=1):.4f}  |diff| over SEEDS "
              f"{diff:.4f}  untrained {losses['untrained']:.4f}  tolerance {3 * spread * np.sqrt(2 / len(SEEDS)):.4f}  "
              f"reported/saved {worst:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 8, sys.argv[2:])
