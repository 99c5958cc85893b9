"""Training stage: fit one MadMiner estimator (or an Ensemble) on the samples of the sample stage.

Reads ``<samples>/x_train.npy`` etc., writes MadMiner's ``save()`` files plus ``model.json`` (what
was trained, per-epoch losses) into ``<run>/model`` atomically.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from app import estimators, fasttrain
from app.datafile import FileInfo
from app.errors import UserError
from app.io import atomic_dir, read_json, write_json
from app.methods import Method
from app.stages import sample

log = logging.getLogger(__name__)

MODEL_NAME = "estimator"  # single estimator: model/estimator_settings.json, ...; ensembles: model/ensemble/


@dataclass
class TrainResult:
    model_dir: Path
    model_file: Path  # what MadMiner's load_estimator / AsymptoticLimits(model_file=...) take
    metrics: dict = field(default_factory=dict)
    reused: bool = False


def training_inputs(method: Method, estimator: str, files: dict[str, Path]) -> dict:
    """Which sample files go into ``Estimator.train`` for this method and estimator."""

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
) -> TrainResult:
    """Train ``method`` on ``samples_dir`` (or reuse ``training.model_dir``)."""
    t = cfg.training
    if t.model_dir:
        return load(Path(t.model_dir), method)

    files = sample.arrays(samples_dir)
    if "x" not in files:
        raise UserError(
            f"stage=train found no training samples in {samples_dir}; run the sample stage first or set "
            "sampling.samples_dir=<an earlier run>/samples"
        )
    estimator_kind = t.estimator
    inputs = training_inputs(method, estimator_kind, files)
    _select_device(t.device)

    import numpy as np
    import torch

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    kwargs = dict(
        method=method.name,
        optimizer=t.optimizer,
        n_epochs=t.n_epochs,
        batch_size=t.batch_size,
        initial_lr=t.initial_lr,
        final_lr=t.final_lr,
        validation_split=t.validation_split if t.validation_split > 0 else None,
        early_stopping=t.early_stopping and t.validation_split > 0,
        scale_inputs=t.scale_inputs,
        clip_gradient=t.clip_gradient,
        n_workers=t.n_workers,
        verbose="none",
        **inputs,
    )
    if method.family != "score":
        kwargs["alpha"] = t.alpha

    history: list[list[dict]] = []
    with atomic_dir(out_dir / "model") as tmp:
        with _epoch_hook(t.n_epochs, history, on_epoch):
            if t.n_estimators > 1:
                from madminer.ml import Ensemble

                ensemble = Ensemble([estimators.build(t, info.path) for _ in range(t.n_estimators)])
                fasttrain.fit(ensemble, t.trainer, t.device, **kwargs)
                ensemble.save(str(tmp / "ensemble"))
                model_name = "ensemble"
            else:
                estimator = estimators.build(t, info.path)
                fasttrain.fit(estimator, t.trainer, t.device, **kwargs)
                estimator.save(str(tmp / MODEL_NAME))
                model_name = MODEL_NAME
        metrics = _loss_metrics(history)
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
    return TrainResult(model_dir, model_dir / meta["model_name"], meta.get("metrics", {}), reused=True)


def _select_device(device: str) -> None:
    """MadMiner trains on CUDA whenever torch sees it; ``cpu`` hides the GPUs from this process."""
    if device == "cpu":
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            log.warning(
                "training.device=cpu requested after CUDA was initialised; MadMiner may still use the GPU"
            )
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "training.device=cuda but torch sees no CUDA device; use training.device=auto or cpu"
            )


@contextmanager
def _epoch_hook(n_epochs: int, history: list[list[dict]], on_epoch):
    """Record every epoch's losses (and report progress) through MadMiner's Trainer.report_epoch."""
    from madminer.utils.ml.trainer import Trainer

    original = Trainer.__dict__["report_epoch"]  # a staticmethod in madminer 0.9.6

    def report_epoch(i_epoch, loss_labels, loss_train, loss_val, *rest, **kwargs):
        if i_epoch == 0:
            history.append([])
        entry = {"epoch": i_epoch + 1, "train_loss": float(loss_train)}
        if loss_val is not None:
            entry["val_loss"] = float(loss_val)
        history[-1].append(entry)
        if on_epoch is not None:
            on_epoch(i_epoch + 1, n_epochs, float(loss_train), None if loss_val is None else float(loss_val))
        return original.__func__(i_epoch, loss_labels, loss_train, loss_val, *rest, **kwargs)

    Trainer.report_epoch = staticmethod(report_epoch)
    try:
        yield
    finally:
        Trainer.report_epoch = original


def _loss_metrics(history: list[list[dict]]) -> dict:
    """Final losses (mean over ensemble members) and per-epoch curves of the first member."""
    if not history or not history[0]:
        return {}
    finals = []
    for run in history:
        with_val = [e for e in run if "val_loss" in e and math.isfinite(e["val_loss"])]
        best = min(with_val, key=lambda e: e["val_loss"]) if with_val else run[-1]
        finals.append(best)
    metrics = {
        "train_loss": sum(f["train_loss"] for f in finals) / len(finals),
        "n_epochs_trained": len(history[0]),
        "loss_history": history[0],
    }
    if all("val_loss" in f for f in finals):
        metrics["val_loss"] = sum(f["val_loss"] for f in finals) / len(finals)
        metrics["best_epoch"] = finals[0]["epoch"]
    return metrics
