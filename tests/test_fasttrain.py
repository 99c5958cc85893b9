"""The fast training path (app.ml.fasttrain) against MadMiner's own Trainer.

Tolerances: ``python bench/trainer.py --agreement 10`` trains every method below with both trainers
for seeds 0-9 on exactly this data and prints the largest |fast - madminer| of the best validation
loss and the seed-to-seed spread (docs/performance.md lists the numbers). AGREEMENT is that largest
difference with a margin; it stays well below the gap between a trained and an untrained network
(asserted too, so a trainer that does not learn fails). MadMiner's reported validation loss is a mean of
batch means (noisier than the fast path's mean over samples), so its minimum over epochs is a little lower.
What the two trainers *save*, for every family on the train stage's path, is compared in
tests/test_trainers_agree.py (slow tier).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from app.ml import fasttrain
from app.toy import simulator

# bench/trainer.py --agreement 10 (CPU, seeds 0-9), largest |fast - madminer| of the best validation loss:
# alices 0.057 (seed spread 0.086), sally 0.0012 (0.0026), nde 0.016 (0.059). Trained vs untrained (seed 1):
# alices 1.11 vs 1.26, sally 0.048 vs 0.234, nde 2.68 vs 2.89.
AGREEMENT = {"alices": 0.08, "sally": 0.003, "nde": 0.03}


def _estimators():
    from madminer import ml

    return {
        "alices": lambda: ml.ParameterizedRatioEstimator(n_hidden=(16, 16)),
        "sally": lambda: ml.ScoreEstimator(n_hidden=(16, 16)),
        "nde": lambda: ml.LikelihoodEstimator(n_mades=1, n_hidden=(16,)),
    }


_COMMON = dict(
    n_epochs=6, batch_size=32, initial_lr=0.01, final_lr=0.001, n_workers=0, verbose="none", validation_split=0.25
)
SETTINGS = {
    name: {"estimator": build, "train": dict(method=name, **_COMMON)} for name, build in _estimators().items()
}


def samples(path, method: str, n: int = 2000, seed: int = 1) -> dict:
    """Training arrays for ``method`` from the toy file at ``path`` (numpy seed ``seed``)."""
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    augmenter = SampleAugmenter(str(path))
    prior = random_morphing_points(10, [("flat", -10, 10)] * 2)
    np.random.seed(seed)
    if method == "sally":
        x, _, t_xz, _ = augmenter.sample_train_local(benchmark("sm"), n_samples=n)
        return dict(x=x, t_xz=t_xz)
    if method == "nde":
        x, theta, _, _ = augmenter.sample_train_density(prior, n_samples=n)
        return dict(x=x, theta=theta)
    x, theta0, _, y, r_xz, t_xz, _ = augmenter.sample_train_ratio(prior, benchmark("sm"), n_samples=n)
    return dict(x=x, y=y, theta=theta0, r_xz=r_xz, t_xz=t_xz)


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return simulator.generate_toy_file(simulator.ToySettings(n_events=4000), tmp_path_factory.mktemp("fast") / "toy.h5")


def _train(method, trainer, data, seed, **overrides):
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    estimator = SETTINGS[method]["estimator"]()
    losses = fasttrain.fit(estimator, trainer, "cpu", **{**SETTINGS[method]["train"], **overrides}, **data)
    return estimator, losses


@pytest.mark.parametrize("method", ["alices", "sally", "nde"])
def test_both_trainers_reach_the_same_validation_loss(toy_path, method):
    data = samples(toy_path, method)
    for seed in (0, 1):
        _, (_, val_mm) = _train(method, "madminer", data, seed)
        _, (train_fast, val_fast) = _train(method, "fast", data, seed)
        assert len(train_fast) == len(val_fast) == len(val_mm) == _COMMON["n_epochs"]
        best_mm, best_fast = float(np.min(val_mm.astype(float))), float(np.min(val_fast))
        assert abs(best_fast - best_mm) < AGREEMENT[method], (seed, best_mm, best_fast)
    # the same network that does not learn (learning rate ~0) is far outside the tolerance
    _, (_, val_untrained) = _train(method, "fast", data, 1, initial_lr=1e-12, final_lr=1e-12)
    assert float(np.min(val_untrained)) - best_mm > AGREEMENT[method], (val_untrained, best_mm)


def test_saved_models_load_with_madminer_and_evaluate(toy_path, tmp_path):
    from madminer.ml import Ensemble, load_estimator

    data = samples(toy_path, "alices", n=600)
    estimator, _ = _train("alices", "fast", data, 0, n_epochs=2)
    estimator.save(str(tmp_path / "single"))
    loaded = load_estimator(str(tmp_path / "single"))
    grid = np.array([[0.0, 0.0], [4.0, -3.0]])
    expected = estimator.evaluate_log_likelihood_ratio(x=data["x"][:50], theta=grid)[0]
    np.testing.assert_allclose(loaded.evaluate_log_likelihood_ratio(x=data["x"][:50], theta=grid)[0], expected)
    assert np.std(expected) > 0

    ensemble = Ensemble([SETTINGS["alices"]["estimator"]() for _ in range(2)])
    results = fasttrain.fit(ensemble, "fast", "cpu", **{**SETTINGS["alices"]["train"], "n_epochs": 2}, **data)
    assert len(results) == 2 and all(len(r[0]) == 2 for r in results)
    ensemble.save(str(tmp_path / "ensemble"))
    again = Ensemble()
    again.load(str(tmp_path / "ensemble"))
    mean = again.evaluate_log_likelihood_ratio(x=data["x"][:50], theta=grid, calculate_covariance=False)[0]
    members = [e.evaluate_log_likelihood_ratio(x=data["x"][:50], theta=grid)[0] for e in ensemble.estimators]
    np.testing.assert_allclose(mean, np.mean(members, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # two members, trained separately


def test_report_epoch_gets_the_unweighted_loss_terms(toy_path, monkeypatch):
    from madminer.utils.ml.trainer import Trainer

    calls = []
    monkeypatch.setattr(Trainer, "report_epoch", staticmethod(lambda *args, **kwargs: calls.append((args, kwargs))))
    data = samples(toy_path, "alices", n=600)
    alpha = 0.3
    _, (losses_train, losses_val) = _train("alices", "fast", data, 0, n_epochs=3, alpha=alpha)
    assert [c[0][0] for c in calls] == [0, 1, 2]
    for (i, labels, loss_train, loss_val, terms_train, terms_val), kwargs in calls:
        assert labels == ["improved_xe", "mse_score"] and kwargs == {"verbose": False}
        assert loss_train == pytest.approx(losses_train[i]) and loss_val == pytest.approx(losses_val[i])
        # MadMiner reports the terms before weighting: total = xe + alpha * mse_score
        assert loss_train == pytest.approx(terms_train[0] + alpha * terms_train[1], rel=1e-5)
        assert loss_val == pytest.approx(terms_val[0] + alpha * terms_val[1], rel=1e-5)
        assert terms_train[1] > 0.01 and abs(loss_train - terms_train.sum()) > 1e-3  # weighting matters here


def test_external_validation_data_get_the_parameter_rescaling(toy_path):
    """Validating on the training data itself gives the training loss.

    MadMiner 0.9.6 rescales x_val and t_xz_val but not theta_val: its trainer misses this by far.
    """
    data = samples(toy_path, "alices", n=800)
    same = {f"{k}_val": v for k, v in data.items()}
    gaps = {}
    for trainer in ("fast", "madminer"):
        _, (losses_train, losses_val) = _train("alices", trainer, {**data, **same}, 0, validation_split=None)
        gaps[trainer] = abs(float(losses_val[-1]) / float(losses_train[-1]) - 1)
    assert gaps["fast"] < 0.03, gaps
    assert gaps["madminer"] > 0.1, gaps


def test_early_stopping_keeps_the_best_epoch(toy_path):
    """A small, over-fitting sample: the kept weights are those of the best validation epoch, not the last."""
    import torch

    data = samples(toy_path, "sally", n=200)
    val = samples(toy_path, "sally", n=2000, seed=2)
    estimator, (_, losses_val) = _train(
        "sally", "fast", {**data, "x_val": val["x"], "t_xz_val": val["t_xz"]}, 0,
        n_epochs=30, batch_size=16, initial_lr=0.02, final_lr=0.02, validation_split=None,
    )  # fmt: skip
    assert np.argmin(losses_val) < len(losses_val) - 1, losses_val  # the last epoch is not the best
    with torch.no_grad():
        t_hat = estimator.evaluate_score(x=val["x"])
    assert np.mean((t_hat - val["t_xz"]) ** 2) == pytest.approx(np.min(losses_val), rel=1e-4)


def test_nans_and_unsupported_estimators(toy_path, caplog):
    from madminer.ml import ParameterizedRatioEstimator

    data = samples(toy_path, "alices", n=400)
    bad = {**data, "x": data["x"].copy()}
    bad["x"][5, 0] = np.nan
    for trainer in ("madminer", "fast"):
        _, (losses_train, losses_val) = _train("alices", trainer, bad, 0, n_epochs=2)
        assert len(losses_train) == len(losses_val) == 0  # both abort before the first epoch

    # a step that leaves NaN outputs only the validation pass sees (one training batch per epoch) ends training
    # like a NaN training loss: MadMiner's BCELoss refuses NaN inputs, which must not escape as an error
    _, (losses_train, losses_val) = _train("alices", "fast", data, 0, n_epochs=3, initial_lr=1e9, batch_size=512)
    assert len(losses_train) == len(losses_val) < 3  # ended early: the train stage reports it as diverged

    class Custom(ParameterizedRatioEstimator):
        pass

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.ml.fasttrain"):
        losses = fasttrain.fit(Custom(n_hidden=(8,)), "fast", "cpu", **{**SETTINGS["alices"]["train"], "n_epochs": 1},
                               **data)  # fmt: skip
    assert len(losses[0]) == 1
    assert [r.getMessage() for r in caplog.records if r.name == "app.ml.fasttrain"] == [
        "fast trainer: Custom is not supported; training with MadMiner's trainer"
    ]
    import torch

    from app.errors import UserError

    if not torch.cuda.is_available():  # the one device resolver (app.ml.device.resolve): one line, before training
        with pytest.raises(UserError, match="training.device=cuda but torch sees no CUDA device"):
            fasttrain.fit(ParameterizedRatioEstimator(n_hidden=(8,)), "fast", "cuda", **SETTINGS["alices"]["train"],
                          **data)  # fmt: skip


@pytest.mark.slow
def test_gpu_check_says_no_gpu_without_one():
    import subprocess
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.sh runs the GPU checks instead")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "no GPU\n", (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("method", ["alices", "carl"])
def test_double_parameterized_estimators_learn(toy_path, method):
    """Two score gradients per batch (theta0 and theta1), in training and validation."""
    import torch
    from madminer import ml
    from madminer.sampling import SampleAugmenter, benchmark, random_morphing_points

    np.random.seed(1)
    prior = random_morphing_points(10, [("flat", -10, 10)] * 2)
    x, th0, th1, y, r_xz, t_xz0, t_xz1 = SampleAugmenter(str(toy_path)).sample_train_more_ratios(
        prior, benchmark("sm"), n_samples=1000
    )[:7]
    data = dict(x=x, theta0=th0, theta1=th1, y=y)
    if method == "alices":
        data.update(r_xz=r_xz, t_xz0=t_xz0, t_xz1=t_xz1)
    best = {}
    for lr in (1e-12, 0.01):
        torch.manual_seed(0)
        np.random.seed(0)
        estimator = ml.DoubleParameterizedRatioEstimator(n_hidden=(16, 16))
        kwargs = {**_COMMON, "initial_lr": lr, "final_lr": lr, "n_epochs": 4}
        _, losses_val = fasttrain.fit(estimator, "fast", "cpu", method=method, **kwargs, **data)
        best[lr] = float(np.min(losses_val))
    assert best[0.01] < best[1e-12] - 0.05, best  # measured: alices 2.24 vs 3.06, carl 0.52 vs 0.69


def test_validation_loss_of_the_saved_model_and_of_an_ensembles_prediction(toy_path):
    """app.ml.validation.loss_terms gives the fast trainer's reported loss of the epoch it saved, and for an Ensemble
    the loss of its mean prediction (MadMiner's Ensemble.evaluate_score): below the members' mean (the MSE is
    convex); for density estimators (the Ensemble averages log p) equal to it."""
    from madminer.ml import Ensemble

    from app.ml import validation

    for method in ("sally", "nde"):
        data, val = samples(toy_path, method, n=400), samples(toy_path, method, n=400, seed=2)
        external = {**data, **{f"{k}_val": v for k, v in val.items()}}
        estimator, (_, losses_val) = _train(method, "fast", external, 0, n_epochs=3, validation_split=None)
        got = validation.loss_terms(estimator, method, 1.0, val)
        assert got["val_loss"] == pytest.approx(float(np.min(losses_val)), rel=1e-5)  # the restored best epoch

        ensemble = Ensemble([SETTINGS[method]["estimator"]() for _ in range(3)])
        fasttrain.fit(ensemble, "fast", "cpu", **{**SETTINGS[method]["train"], "n_epochs": 3, "validation_split": None},
                      **external)  # fmt: skip
        members = [validation.loss_terms(m, method, 1.0, val)["val_loss"] for m in ensemble.estimators]
        mean_prediction = validation.loss_terms(ensemble, method, 1.0, val)["val_loss"]
        if method == "sally":
            t_mean = np.mean([m.evaluate_score(x=val["x"]) for m in ensemble.estimators], axis=0)
            assert mean_prediction == pytest.approx(np.mean((t_mean - val["t_xz"]) ** 2), rel=1e-4)
            assert mean_prediction < np.mean(members) - 1e-4, (mean_prediction, members)
        else:
            assert mean_prediction == pytest.approx(np.mean(members), rel=1e-5) and np.std(members) > 1e-3


def test_an_ensembles_val_metrics_are_its_mean_predictions():
    from app.stages.train import ensemble_metrics

    members = {"val_loss": 2.0, "val_mse_score": 2.0, "val_loss_ensemble_std": 0.1, "train_loss": 1.5, "saved_epoch": 3}
    out = ensemble_metrics(members, {"val_loss": 1.8, "val_mse_score": 1.8})
    assert out == {**members, "val_loss": 1.8, "val_mse_score": 1.8, "val_loss_members_mean": 2.0,
                   "val_mse_score_members_mean": 2.0}  # fmt: skip
    # no common validation samples (training.validation_split > 0): the members' mean, under both names
    means = {"val_loss_members_mean": 2.0, "val_mse_score_members_mean": 2.0}
    assert ensemble_metrics(members, None) == {**members, **means}
