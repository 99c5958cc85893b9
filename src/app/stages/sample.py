"""Sampling stage: draw training samples from the MadMiner file with MadMiner's SampleAugmenter.

Writes MadMiner's .npy files (x_train.npy, theta0_train.npy, r_xz_train.npy, ...) plus
``samples.json`` (what was drawn, and from which file) into ``<run>/samples`` atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from app.domain import seeds
from app.domain.datafile import FileInfo
from app.domain.methods import Method
from app.domain.theta import double_theta1_spec, is_single_point, ratio_theta1, to_madminer_theta
from app.errors import UserError
from app.ml import madminer_patches
from app.store.files import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

FILENAME = "train"  # madminer's file suffix: x_train.npy, theta0_train.npy, ...
VAL_FILENAME = "val"  # validation samples from MadMiner's validation partition: x_val.npy, ...


@dataclass
class SampleResult:
    samples_dir: Path
    n_samples: int
    n_effective: float | None
    n_validation: int = 0


def run(cfg: DictConfig, method: Method, info: FileInfo, out_dir: Path) -> SampleResult:
    """Sample training data for ``method`` into ``out_dir/samples``."""
    import numpy as np
    from madminer.sampling import SampleAugmenter

    s = cfg.sampling
    augmenter = SampleAugmenter(str(info.path), include_nuisance_parameters=s.include_nuisance)
    common = dict(
        n_samples=s.n_samples,
        sample_only_from_closest_benchmark=s.sample_only_from_closest_benchmark,
        test_split=s.test_split,
        validation_split=s.validation_split,
        partition="train",
        n_processes=s.n_processes,
        filename=FILENAME,
    )
    target = out_dir / "samples"
    n_val = n_validation_samples(s)
    # The random theta points and MadMiner's shuffle draw from the stage's own seed, each theta set from its own
    # (madminer_patches.seeded_sets): the same samples for any n_processes, whatever ran before in the process.
    with (
        seeds.numpy_global(s.seed, "sample"),
        madminer_patches.seeded_sets(seeds.derive(s.seed, "sample", "sets")),
        madminer_patches.events_in_memory(),
        atomic_dir(target) as tmp,
    ):
        common["folder"] = str(tmp)
        x, n_effective = _draw(augmenter, cfg, info, method, common)
        x_val = None
        if n_val:
            # Same theta spec, MadMiner's validation partition: no validation event is a training event.
            val = dict(common, n_samples=n_val, partition="validation", filename=VAL_FILENAME)
            x_val, _ = _draw(augmenter, cfg, info, method, val)
        write_json(
            tmp / "samples.json",
            {
                "kind": method.sampling,
                "estimator": cfg.training.estimator,
                "method": method.name,
                "n_samples": int(x.shape[0]),
                "n_validation": 0 if x_val is None else int(x_val.shape[0]),
                "n_effective": float(np.min(n_effective)),
                "data_path": str(info.path),
                "parameters": list(info.parameters),
                "observables": list(info.observables),
                "sampling": OmegaConf.to_container(s, resolve=True, enum_to_str=True),
            },
        )
    n_val_drawn = 0 if x_val is None else int(x_val.shape[0])
    log.info("sampled %d training and %d validation samples into %s", x.shape[0], n_val_drawn, target)
    warn_if_oversampled(cfg, info, int(x.shape[0]), float(np.min(n_effective)))
    return SampleResult(target, int(x.shape[0]), float(np.min(n_effective)), n_validation=n_val_drawn)


def n_validation_samples(s: DictConfig) -> int:
    """Validation samples to draw from MadMiner's validation partition (0 when there is none)."""
    if s.validation_split <= 0:
        return 0
    if s.get("n_validation_samples") is not None:
        return int(s.n_validation_samples)
    return max(1, s.n_samples // 4)


def _draw(augmenter, cfg: DictConfig, info: FileInfo, method: Method, common: dict):
    """One call of the SampleAugmenter method that ``method`` trains on; returns (x, n_effective)."""
    s = cfg.sampling
    if method.sampling == "ratio" and cfg.training.estimator == "double_parameterized":
        if is_single_point(s.theta1) and common["partition"] == "train":
            log.info(
                "double_parameterized: sampling.theta1 is one point, so theta1 is drawn like theta0 (%s) "
                "for the estimator to learn r(x | theta0, theta1) at varying theta1",
                _describe(double_theta1_spec(cfg, info)),
            )
        result = augmenter.sample_train_more_ratios(
            theta0=to_madminer_theta(s.theta0), theta1=ratio_theta1(cfg, info), **common
        )
    elif method.sampling == "ratio":
        result = augmenter.sample_train_ratio(
            theta0=to_madminer_theta(s.theta0), theta1=to_madminer_theta(s.theta1), **common
        )
    elif method.sampling == "local":
        result = augmenter.sample_train_local(theta=to_madminer_theta(s.theta), **common)
    else:
        result = augmenter.sample_train_density(theta=to_madminer_theta(s.theta), **common)
    return result[0], result[-1]


def _describe(spec) -> str:
    return ", ".join(f"{k}={v}" for k, v in OmegaConf.to_container(spec).items() if v is not None)


def warn_if_oversampled(cfg: DictConfig, info: FileInfo, n_samples: int, n_effective: float) -> None:
    """Warn when more samples are drawn than the train partition has distinct events (they repeat)."""
    s = cfg.sampling
    n_distinct = int(info.n_events * (1.0 - s.test_split - s.validation_split))
    if n_samples > n_distinct:
        log.warning(
            "sampling.n_samples=%d exceeds the %d distinct events of the train partition (%d events x "
            "(1 - test_split - validation_split)): events repeat, effective sample size %.0f",
            n_samples,
            n_distinct,
            info.n_events,
            n_effective,
        )


def load(samples_dir: Path, method: Method) -> SampleResult:
    """The samples in ``samples_dir`` (made by :func:`run`); they must be of the kind ``method`` trains on."""
    meta_file = samples_dir / "samples.json"
    if not meta_file.is_file():
        raise UserError(
            f"no samples in {samples_dir} (samples.json missing); run the sample stage first or set "
            "sampling.samples_dir=<an earlier run>/samples"
        )
    meta = read_json(meta_file)
    if meta["kind"] != method.sampling:
        raise UserError(
            f"{samples_dir} holds sampling={meta['kind']} samples but training={method.name} needs "
            f"sampling={method.sampling}; point sampling.samples_dir at matching samples"
        )
    return SampleResult(
        samples_dir, meta["n_samples"], meta.get("n_effective"), n_validation=meta.get("n_validation", 0)
    )


def arrays(samples_dir: Path, filename: str = FILENAME) -> dict[str, Path]:
    """MadMiner .npy files of a samples folder by their name (x, theta0, r_xz, ...); ``filename="val"``: validation."""
    suffix = f"_{filename}.npy"
    return {p.name[: -len(suffix)]: p for p in sorted(samples_dir.glob(f"*{suffix}"))}
