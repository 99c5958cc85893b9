"""Training stage: fit one MadMiner estimator (or an Ensemble) on the samples of the sample stage.

Reads ``<samples>/x_train.npy`` etc., writes MadMiner's ``save()`` files plus ``model.json`` (what
was trained, per-epoch losses) into ``<run>/model`` atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.errors import UserError
from app.ml import device, estimators, fasttrain, madminer_patches
from app.ml import validation as validation_loss
from app.stages import sample
from app.store.files import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

MODEL_NAME = "estimator"  # single estimator: model/estimator_settings.json, ...; ensembles: model/ensemble/


@dataclass
class TrainResult:
    model_dir: Path
    model_file: Path  # what MadMiner's load_estimator / AsymptoticLimits(model_file=...) take
    metrics: dict = field(default_factory=dict)


def training_inputs(method: Method, estimator: str, files: dict[str, Path], suffix: str = "") -> dict:
    """Which sample files go into ``Estimator.train`` for this method and estimator.

    ``suffix="_val"``: the same inputs as MadMiner's external validation arguments (``x_val``, ``theta_val``, ...).
    """
    inputs = _inputs(method, estimator, files)
    return {f"{k}{suffix}": v for k, v in inputs.items()}


def _inputs(method: Method, estimator: str, files: dict[str, Path]) -> dict:
    def need(key: str) -> str:
        if key not in files:
            raise UserError(f"samples lack {key}_train.npy needed by {method.name}; re-run the sample stage")
        return str(files[key])

    if method.family == "score":
        return dict(x=need("x"), t_xz=need("t_xz"))
    if method.family == "density":
        inputs = dict(x=need("x"), theta=need("theta"))
        if method.needs_t_xz:
            inputs["t_xz"] = need("t_xz")
        return inputs
    inputs = dict(x=need("x"), y=need("y"))
    if estimator == "double_parameterized":
        inputs.update(theta0=need("theta0"), theta1=need("theta1"))
        if method.needs_t_xz:
            inputs.update(t_xz0=need("t_xz0"), t_xz1=need("t_xz1"))
    else:
        inputs["theta"] = need("theta0")
        if method.needs_t_xz:
            inputs["t_xz"] = need("t_xz")
    if method.needs_r_xz:
        inputs["r_xz"] = need("r_xz")
    return inputs


def run(
    cfg: DictConfig,
    method: Method,
    info: FileInfo,
    samples_dir: Path,
    out_dir: Path,
    on_epoch: Callable[[int, int, float, float | None], None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``method`` on ``samples_dir`` into ``out_dir/model``.

    ``on_record(entry)`` gets every epoch's record (``epoch``, ``train_loss``, ``val_loss`` and each loss term,
    ``val_improved_xe``, ...) with either trainer; an exception it raises ends training and leaves no model (a
    search's pruner stops a trial this way)."""
    t = cfg.training
    files = sample.arrays(samples_dir)
    if "x" not in files:
        raise UserError(
            f"stage=train found no training samples in {samples_dir}; run the sample stage first or set "
            "sampling.samples_dir=<an earlier run>/samples"
        )
    estimator_kind = t.estimator
    inputs = training_inputs(method, estimator_kind, files)
    validation = _validation(cfg, method, estimator_kind, samples_dir)

    import numpy as np
    import torch

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    in_sample = t.validation_split > 0
    kwargs = dict(
        method=method.name,
        optimizer=t.optimizer,
        n_epochs=t.n_epochs,
        batch_size=t.batch_size,
        initial_lr=t.initial_lr,
        final_lr=t.final_lr,
        # MadMiner ignores validation_split when external validation data is given, but needs it non-None
        # for early stopping
        validation_split=t.validation_split if in_sample else (0.25 if validation else None),
        early_stopping=t.early_stopping and (in_sample or bool(validation)),
        scale_inputs=t.scale_inputs,
        clip_gradient=t.clip_gradient,
        n_workers=t.n_workers,
        verbose="none",
        **inputs,
        **({} if in_sample else validation),
    )
    if method.family != "score":
        kwargs["alpha"] = t.alpha
    if t.trainer == "fast":
        kwargs["compile"] = t.compile  # CUDA graphs (app.ml.graphs); MadMiner's train() has no such option
    if t.trainer == "madminer" and validation and not in_sample:
        kwargs.update(_prescaled_validation_thetas(kwargs, estimator_kind))

    history: list[list[dict]] = []
    ensemble_val = None
    with atomic_dir(out_dir / "model") as tmp:
        record = _recorder(t.n_epochs, history, on_epoch, on_record)
        with device.use(t.device) as name, madminer_patches.epoch_reports(record):
            if t.n_estimators > 1:
                from madminer.ml import Ensemble

                ensemble = Ensemble([estimators.build(t, info.path) for _ in range(t.n_estimators)])
                fasttrain.fit(ensemble, t.trainer, name, **kwargs)
                madminer_patches.observable_input_scaling(ensemble)
                ensemble.save(str(tmp / "ensemble"))
                model_name = "ensemble"
                if validation and not in_sample:  # the loss of the ensemble's prediction, not its members'
                    arrays = {k.removesuffix("_val"): v for k, v in validation.items()}
                    ensemble_val = validation_loss.loss_terms(ensemble, method.name, t.alpha, arrays, name)
            else:
                estimator = estimators.build(t, info.path)
                fasttrain.fit(estimator, t.trainer, name, **kwargs)
                madminer_patches.observable_input_scaling(estimator)
                estimator.save(str(tmp / MODEL_NAME))
                model_name = MODEL_NAME
        _check_finished(history, t.n_estimators, t.n_epochs)
        metrics = loss_metrics(history, early_stopping=kwargs["early_stopping"])
        if t.n_estimators > 1:
            metrics = ensemble_metrics(metrics, ensemble_val)
        write_json(
            tmp / "model.json",
            {
                "method": method.name,
                "family": method.family,
                "estimator": estimator_kind,
                "n_estimators": t.n_estimators,
                "model_name": model_name,
                "parameters": list(info.parameters),
                "observables": list(info.observables),
                "samples_dir": str(samples_dir),
                "training": OmegaConf.to_container(t, resolve=True, enum_to_str=True),
                # what val_* measured: samples of the validation partition, MadMiner's split of the training
                # samples (leaks), or nothing
                "validation": "in-sample split (leaks)" if in_sample else ("partition" if validation else "none"),
                # an ensemble's val_*: the loss of its "mean prediction", or (no common validation samples) the mean
                # of its "members'" losses (ensemble_metrics); null for one estimator
                "ensemble_val": None if t.n_estimators == 1 else "mean prediction" if ensemble_val else "members",
                "metrics": metrics,
            },
        )
    model_dir = out_dir / "model"
    return TrainResult(model_dir, model_dir / model_name, metrics)


def load(model_dir: Path, method: Method) -> TrainResult:
    meta_file = model_dir / "model.json"
    if not meta_file.is_file():
        raise UserError(
            f"no trained model in {model_dir} (model.json missing); run the train stage first or set "
            "training.model_dir=<an earlier run>/model"
        )
    meta = read_json(meta_file)
    if meta["method"] != method.name:
        raise UserError(
            f"{model_dir} holds a {meta['method']} model but training={method.name} was chosen; "
            f"use training={meta['method']} or another training.model_dir"
        )
    return TrainResult(model_dir, model_dir / meta["model_name"], meta.get("metrics", {}))


def _validation(cfg: DictConfig, method: Method, estimator: str, samples_dir: Path) -> dict:
    """MadMiner's external validation inputs (x_val, theta_val, ...) from the validation-partition samples."""
    t = cfg.training
    files = sample.arrays(samples_dir, sample.VAL_FILENAME)
    if t.validation_split > 0:
        log.warning(
            "training.validation_split=%s validates on a split of the training samples, which MadMiner draws with "
            "replacement: validation rows repeat training events and val_* metrics are optimistic. "
            "training.validation_split=0 validates on the validation partition instead",
            t.validation_split,
        )
        return {}
    if "x" not in files:
        log.warning(
            "no validation samples in %s (sampling.validation_split=0?): training without validation, "
            "no val_* metrics and no early stopping", samples_dir,
        )
        return {}
    return training_inputs(method, estimator, files, suffix="_val")


def _prescaled_validation_thetas(kwargs: dict, estimator: str) -> dict:
    """MadMiner 0.9.6's own Trainer rescales theta (mean and std of the training thetas) but not theta_val,
    theta0_val, theta1_val: its validation loss would see unscaled parameters. Give it the validation thetas
    already scaled exactly as it scales the training ones (morphing-aware estimators do not scale parameters).
    The fast trainer (training.trainer=fast) scales them itself."""
    import numpy as np

    keys = [k for k in ("theta_val", "theta0_val", "theta1_val") if k in kwargs]
    if not keys or estimator in ("morphing_aware", "quadratic_morphing_aware"):
        return {}
    if estimator == "double_parameterized":
        reference = np.concatenate([np.load(kwargs["theta0"]), np.load(kwargs["theta1"])])
    else:
        reference = np.load(kwargs["theta"])
    mean, std = np.mean(reference, axis=0), np.maximum(np.std(reference, axis=0), 1.0e-6)
    return {k: (np.load(kwargs[k]) - mean[np.newaxis, :]) / std[np.newaxis, :] for k in keys}


class TrainingFailed(UserError):
    """Training ended without a usable model (NaN losses)."""


def _check_finished(history: list[list[dict]], n_estimators: int, n_epochs: int) -> None:
    """MadMiner ends training silently when a loss becomes NaN: a job with such a model must fail."""
    for i in range(n_estimators):
        run = history[i] if i < len(history) else []
        bad = [e["epoch"] for e in run if not all(math.isfinite(v) for k, v in e.items() if k.endswith("loss"))]
        if len(run) < n_epochs or bad:
            epoch = bad[0] if bad else len(run) + 1
            member = f" (ensemble member {i})" if n_estimators > 1 else ""
            raise TrainingFailed(
                f"training diverged: the loss became NaN or infinite in epoch {epoch}{member}; lower "
                "training.initial_lr, set training.clip_gradient, or check the samples for extreme weights"
            )


def _recorder(n_epochs: int, history: list[list[dict]], on_epoch, on_record=None):
    """Record every epoch's losses (and report progress); for :func:`app.ml.madminer_patches.epoch_reports`.

    Besides the total (alpha-weighted) loss it records each loss term by MadMiner's label, unweighted:
    ``train_improved_xe``, ``val_mse_score``, ... (these do not depend on alpha).
    """

    def record(i_epoch, loss_labels, loss_train, loss_val, contributions_train, contributions_val):
        if i_epoch == 0:
            history.append([])
        entry = {"epoch": i_epoch + 1, "train_loss": float(loss_train)}
        if loss_val is not None:
            entry["val_loss"] = float(loss_val)
        for prefix, values in (("train", contributions_train), ("val", contributions_val)):
            if values is not None and (prefix == "train" or loss_val is not None):
                for label, value in zip(loss_labels, values):
                    entry[f"{prefix}_{label}"] = float(value)
        history[-1].append(entry)
        if on_epoch is not None:
            on_epoch(i_epoch + 1, n_epochs, float(loss_train), None if loss_val is None else float(loss_val))
        if on_record is not None:
            on_record(dict(entry))

    return record


def saved_epoch(run: list[dict], early_stopping: bool) -> dict:
    """The epoch whose weights were saved: MadMiner restores the best validation epoch under early stopping
    (the first minimum of the total validation loss, if it beats the last epoch), else keeps the last."""
    with_val = [e for e in run if "val_loss" in e and math.isfinite(e["val_loss"])]
    if early_stopping and with_val:
        best = min(with_val, key=lambda e: e["val_loss"])  # min() keeps the first of equal values
        if best["val_loss"] < run[-1].get("val_loss", math.inf):
            return best
    return run[-1]


def ensemble_metrics(metrics: dict, ensemble_val: dict | None) -> dict:
    """An ensemble's loss metrics: ``val_*`` become the loss of the ensemble's mean prediction on the validation
    samples (``ensemble_val``, from :func:`app.ml.validation.loss_terms`), which a sweep over ``n_estimators`` can
    compare with a single estimator's ``val_*``; the members' mean of each moves to ``val_*_members_mean``
    (``val_*_ensemble_std`` stays their spread). Without ``ensemble_val`` (no validation partition: each member
    validated on its own split of the training samples) ``val_*`` remain the members' mean, as model.json's
    ``ensemble_val`` says. ``train_*`` are always the members' mean (losses of the training epochs)."""
    out = dict(metrics)
    for key in metrics:
        if key.startswith("val_") and not key.endswith("_ensemble_std"):
            out[f"{key}_members_mean"] = metrics[key]
            if ensemble_val is not None and key in ensemble_val:
                out[key] = float(ensemble_val[key])
    return out


def loss_metrics(history: list[list[dict]], early_stopping: bool) -> dict:
    """Losses of the saved model (mean over ensemble members, plus their spread) and per-epoch curves.

    Every key of the saved epoch but ``epoch`` becomes a metric: ``train_loss``, ``val_loss`` (the loss of the
    model that is saved, not the minimum over epochs) and each term, ``val_improved_xe``, ``val_mse_score``, ...
    """
    import numpy as np

    if not history or not history[0]:
        return {}
    finals = [saved_epoch(run, early_stopping) for run in history]
    metrics: dict = {}
    for key in finals[0]:
        if key == "epoch" or not all(key in f for f in finals):
            continue
        values = np.array([f[key] for f in finals], dtype=float)
        metrics[key] = float(values.mean())
        if len(finals) > 1:
            metrics[f"{key}_ensemble_std"] = float(values.std())
    metrics["saved_epoch"] = finals[0]["epoch"]
    metrics["n_epochs_trained"] = len(history[0])
    metrics["loss_history"] = history[0]
    return metrics
