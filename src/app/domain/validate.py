"""Checks that need the data file: run before any stage work, each failure a one-line UserError.

:func:`check_config` also fits per-parameter defaults to the file: a ``random_morphing_points`` prior
list with one entry applies that prior to each parameter (so the defaults run on 1- and 2-parameter files).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, ListConfig, OmegaConf

from app.config import TRAINERS
from app.domain.datafile import FileInfo
from app.domain.methods import MODEL_MODES, THETAREF_MODES, Method, get_method
from app.domain.theta import grid_ranges
from app.errors import UserError


def check_config(cfg: DictConfig, info: FileInfo) -> Method:
    check_finite(cfg)
    method = get_method(cfg.training.method)
    estimator = cfg.training.estimator
    method.check_estimator(estimator)
    kind = cfg.sampling.kind
    if kind != method.sampling:
        raise UserError(
            f"training={method.name} trains on sampling={method.sampling} samples but sampling={kind} was chosen; "
            f"drop the sampling override (the training preset selects sampling={method.sampling})"
        )
    if estimator == "quadratic_morphing_aware" and info.n_parameters != 1:
        raise UserError(
            f"training.estimator=quadratic_morphing_aware supports exactly 1 parameter but {info.path.name} has "
            f"{info.n_parameters} ({', '.join(info.parameters)}); use a 1-parameter file (data.n_parameters=1 for "
            "the toy) or another estimator"
        )
    if estimator == "morphing_aware" and not info.has_morphing:
        raise UserError(f"training.estimator=morphing_aware needs a morphing setup, {info.path} has none")

    _positive("sampling.n_samples", cfg.sampling.n_samples)
    _positive("training.n_epochs", cfg.training.n_epochs)
    _positive("training.batch_size", cfg.training.batch_size)
    _positive("training.n_estimators", cfg.training.n_estimators)
    _positive("evaluation.luminosity", cfg.evaluation.luminosity)
    _positive("evaluation.n_test_samples", cfg.evaluation.n_test_samples)
    _fraction("sampling.test_split", cfg.sampling.test_split, allow_zero=False)
    _fraction("sampling.validation_split", cfg.sampling.validation_split, allow_zero=True)
    if cfg.sampling.test_split + cfg.sampling.validation_split >= 1:
        raise UserError("sampling.test_split + sampling.validation_split must be < 1; lower one of them")
    _fraction("training.validation_split", cfg.training.validation_split, allow_zero=True)
    if cfg.training.n_workers < 0:
        raise UserError("training.n_workers must be >= 0 (0 = load batches in the main process)")
    _check_nuisance(cfg, info)
    if cfg.training.trainer not in TRAINERS:
        raise UserError(
            f"training.trainer={cfg.training.trainer} is unknown; use {' or '.join(TRAINERS)} "
            "(fast: the app's training loop, madminer: MadMiner's own Trainer)"
        )

    for key in ("theta0", "theta1") if kind == "ratio" else ("theta",):
        if cfg.sampling[key] is None:
            raise UserError(
                f"sampling={kind} needs sampling.{key} (a theta spec such as {{type: benchmark, name: sm}})"
            )
        check_theta(cfg.sampling[key], info, f"sampling.{key}")
    if kind == "local" and cfg.sampling.theta.type not in ("benchmark", "morphing_point"):
        raise UserError(
            f"sampling=local trains a score at one point but sampling.theta has type {cfg.sampling.theta.type}; "
            "use type benchmark or morphing_point"
        )

    ev = cfg.evaluation
    if ev.theta_true is not None and len(ev.theta_true) != info.n_parameters:
        raise UserError(
            f"evaluation.theta_true has {len(ev.theta_true)} values but {info.path.name} has {info.n_parameters} "
            f"parameters ({', '.join(info.parameters)}); give one value per parameter"
        )
    ranges = _plain(ev.grid.ranges)
    if ranges is not None:
        pairs = ranges if isinstance(ranges, list) else []
        if len(pairs) != info.n_parameters or any(
            not isinstance(r, list) or len(r) != 2 or not all(_number(v) for v in r) or r[0] >= r[1] for r in pairs
        ):
            raise UserError(
                f"evaluation.grid.ranges must be {info.n_parameters} pairs [min, max] with min < max "
                f"(one per parameter: {', '.join(info.parameters)})"
            )
    resolutions = _plain(ev.grid.resolutions)
    res_list = resolutions if isinstance(resolutions, list) else [resolutions]
    if not all(isinstance(r, int) and r >= 2 for r in res_list) or (
        isinstance(resolutions, list) and len(resolutions) != info.n_parameters
    ):
        raise UserError(
            "evaluation.grid.resolutions must be an int >= 2 or one such int per parameter "
            f"({info.n_parameters} here)"
        )
    for var in ev.hist_vars or []:
        _observable(var, info, "evaluation.hist_vars")
    if ev.fisher.observable is not None:
        _observable(ev.fisher.observable, info, "evaluation.fisher.observable")
    include = _plain(ev.include_xsec)
    if not (
        isinstance(include, bool)
        or (isinstance(include, list) and include and all(isinstance(v, bool) for v in include))
    ):
        raise UserError("evaluation.include_xsec must be true, false or a list such as [true,false]")
    from app.domain import metrics

    metrics.objective(cfg.objective.metric, cfg.objective.direction, method.name)
    for mode in limit_modes(cfg, method):
        families = MODEL_MODES.get(mode)
        if families and method.family not in families:
            raise UserError(
                f"evaluation mode {mode} needs a {' or '.join(families)} model but training={method.name} trains a "
                f"{method.family} model; use mode {method.limit_mode} (or leave evaluation.modes=null)"
            )
        if mode in THETAREF_MODES and cfg.sampling.theta is None:
            raise UserError(f"evaluation mode {mode} needs sampling.theta, the point the score was trained at")
    if cfg.stage in ("all", "evaluate"):
        grid_ranges(cfg, info)  # a file without parameter ranges needs evaluation.grid.ranges
    from app.ml import device

    device.check(cfg.training.device)  # training.device=cuda without a GPU: fail now, not after sampling
    return method


def _check_nuisance(cfg: DictConfig, info: FileInfo) -> None:
    """Nuisance parameters, as MadMiner 0.9.6 handles them (docs/toy.md, "Nuisance parameters"):

    * its SampleAugmenter samples with them (theta gets one column per nuisance parameter, the joint score one
      component) and its estimators train on such samples: sampling.include_nuisance=true is honoured for
      stage=sample and stage=train;
    * its AsymptoticLimits cannot profile them: refused for the stages that evaluate;
    * any of its readers (DataAnalyzer) fails on a file with nuisance parameters when told to leave them out
      (include_nuisance_parameters=False: its NuisanceMorpher looks up the nuisance benchmarks it has just
      filtered out, a ValueError): sampling.include_nuisance=false is refused on such a file;
    * sampling.include_nuisance=true on a file without them is refused (nothing to include).
    """
    import h5py

    with h5py.File(info.path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["nuisance_parameters/names"][()]] if (
            "nuisance_parameters/names" in f
        ) else []
    if not cfg.sampling.include_nuisance:
        if names:
            raise UserError(
                f"{info.path.name} has nuisance parameters ({', '.join(names)}) and MadMiner 0.9.6 cannot read it "
                "without them; set sampling.include_nuisance=true with stage=sample or stage=train (its limits "
                "cannot profile them), or use a file without nuisance parameters"
            )
        return
    if not names:
        raise UserError(
            f"sampling.include_nuisance=true but {info.path.name} has no nuisance parameters; "
            "set sampling.include_nuisance=false"
        )
    if cfg.stage in ("all", "evaluate", "plot"):
        raise UserError(
            "sampling.include_nuisance=true cannot be evaluated: MadMiner 0.9.6's AsymptoticLimits does not support "
            "nuisance parameters; run stage=sample or stage=train with it, or set sampling.include_nuisance=false"
        )


def check_finite(cfg: DictConfig) -> None:
    """NaN or inf in any numeric option (``training.alpha=nan``, ``evaluation.luminosity=inf``, a list entry)
    is rejected before any stage work: MadMiner would only fail on it (or silently train on NaN) much later."""

    def walk(node, key: str):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{key}[{i}]")
        else:
            yield key, node

    for key, value in walk(OmegaConf.to_container(cfg, resolve=True), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} is not a finite number; set {key} to a finite value")


def check_theta(spec: DictConfig, info: FileInfo, key: str) -> None:
    kind = spec.type
    n = info.n_parameters
    if kind == "benchmark":
        _benchmark(spec.name, info, f"{key}.name")
    elif kind == "benchmarks":
        if not spec.names:
            raise UserError(f"{key}.names must list benchmark names for type=benchmarks")
        for name in spec.names:
            _benchmark(name, info, f"{key}.names")
    elif kind in ("morphing_point", "morphing_points"):
        values = _plain(spec["values"])
        points = [values] if kind == "morphing_point" else values
        if not isinstance(points, list) or not points:
            raise UserError(
                f"{key}.values must be a list of {'numbers' if kind == 'morphing_point' else 'points'}"
            )
        for point in points:
            if not isinstance(point, list) or len(point) != n:
                raise UserError(
                    f"{key}.values: point {point} has the wrong number of parameters; {info.path.name} has {n} "
                    f"({', '.join(info.parameters)}), give one value per parameter"
                )
    elif kind == "random_morphing_points":
        if spec.n is None or spec.n <= 0:
            raise UserError(f"{key}.n must be a positive number of random theta points")
        priors = _plain(spec.priors)
        if isinstance(priors, list) and len(priors) == 1 and n > 1:
            priors = priors * n  # one prior = the same prior for each parameter of the file
            spec.priors = priors
        if not isinstance(priors, list) or len(priors) != n:
            got = len(priors) if isinstance(priors, list) else 0
            raise UserError(
                f"{key}.priors has {got} entries but {info.path.name} has {n} parameters "
                f"({', '.join(info.parameters)}); give one [gaussian, mean, std] or [flat, min, max] per parameter "
                "(or one for all)"
            )
        for prior in priors:
            if not (isinstance(prior, list) and len(prior) == 3 and prior[0] in ("gaussian", "flat")):
                raise UserError(
                    f"{key}.priors entry {prior} must be [gaussian, mean, std] or [flat, min, max]"
                )


def limit_modes(cfg: DictConfig, method: Method) -> list[str]:
    modes = cfg.evaluation.modes
    if modes is None:
        return ["rate", "histo", method.limit_mode]
    return list(modes)


def _benchmark(name, info: FileInfo, key: str) -> None:
    if name not in info.benchmarks:
        raise UserError(
            f"{key}: benchmark {name!r} is not in {info.path.name}; available: {', '.join(info.benchmarks)}"
        )


def _observable(name: str, info: FileInfo, key: str) -> None:
    if name not in info.observables:
        raise UserError(
            f"{key}: observable {name!r} is not in {info.path.name}; available: {', '.join(info.observables)}"
        )


def _positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key} must be positive, got {value}; set {key}=<a positive number>")


def _fraction(key: str, value: float, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        raise UserError(f"{key} must be in {'[0' if allow_zero else '(0'}, 1), got {value}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(node):
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node
