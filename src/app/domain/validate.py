"""The checks of a run's config, each failure one line (a UserError), all before any stage work.

:func:`check_options` needs only the config: every option against its type, its range or choices (declared once,
on the dataclasses of :mod:`app.config`), NaN/inf, and what the methods and metric tables allow. It runs first,
before the data file is generated or read. :func:`check_config` adds what needs the data file, and also fits
per-parameter defaults to it: a ``random_morphing_points`` prior list with one entry applies that prior to each
parameter (so the defaults run on 1- and 2-parameter files).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from enum import Enum

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app.config import DATA_KINDS, Config
from app.domain import metrics
from app.domain.datafile import FileInfo
from app.domain.methods import MODEL_MODES, THETAREF_MODES, Method, get_method
from app.domain.theta import grid_ranges
from app.errors import UserError, first_line
from app.ml import device
from app.toy.simulator import ToySettings

# paths: only resolvable inside a job (${hydra:...}); hydra: Hydra's own (in a config composed with
# return_hydra_config=True); vars: free-form, read through the interpolations of the options that use them (and
# checked there)
UNRESOLVED = ("paths", "hydra")
UNCHECKED = (*UNRESOLVED, "vars")


def check_options(cfg: DictConfig) -> Method:
    """Check everything that needs only the config; return the method of ``training``."""
    options = _resolved(cfg)
    check_finite({k: v for k, v in options.items() if k not in UNCHECKED})
    data_kind = (options.get("data") or {}).get("kind")
    if data_kind not in DATA_KINDS:
        raise UserError(f"data.kind={_shown(data_kind)} is not a choice; use one of: {', '.join(DATA_KINDS)} "
                        "(data=toy or data=file data.path=...)")
    _check_fields(options, Config, "")
    method = get_method(options["training"]["method"])
    method.check_estimator(options["training"]["estimator"])
    sampling, evaluation = options["sampling"], options["evaluation"]
    kind = sampling["kind"]
    if kind != method.sampling:
        raise UserError(
            f"training={method.name} trains on sampling={method.sampling} samples but sampling={kind} was chosen; "
            f"drop the sampling override (the training preset selects sampling={method.sampling})"
        )
    if sampling["test_split"] + sampling["validation_split"] >= 1:
        raise UserError(
            f"sampling.test_split + sampling.validation_split = {sampling['test_split']} + "
            f"{sampling['validation_split']} leaves no training events; lower one of them (the sum must be < 1)"
        )
    for key in ("theta0", "theta1") if kind == "ratio" else ("theta",):
        if sampling[key] is None:
            raise UserError(
                f"sampling={kind} needs sampling.{key} (a theta spec such as {{type: benchmark, name: sm}})"
            )
    if kind == "local" and sampling["theta"]["type"] not in ("benchmark", "morphing_point"):
        raise UserError(
            f"sampling=local trains a score at one point but sampling.theta has type {sampling['theta']['type']}; "
            "use type benchmark or morphing_point"
        )
    include = evaluation["include_xsec"]
    if not (isinstance(include, bool) or (isinstance(include, list) and include
                                          and all(isinstance(v, bool) for v in include))):
        raise UserError(f"evaluation.include_xsec={_shown(include)} is not a choice; use true, false or a list such as "
                        "[true,false]")

    metrics.objective(options["objective"]["metric"], options["objective"]["direction"], method.name)
    for mode in limit_modes(cfg, method):
        families = MODEL_MODES.get(mode)
        if families and method.family not in families:
            raise UserError(
                f"evaluation mode {mode} needs a {' or '.join(families)} model but training={method.name} trains a "
                f"{method.family} model; use mode {method.limit_mode} (or leave evaluation.modes=null)"
            )
        if mode in THETAREF_MODES and sampling["theta"] is None:
            raise UserError(f"evaluation mode {mode} needs sampling.theta, the point the score was trained at")
    if data_kind == "toy":
        _check_toy(options["data"])

    device.check(options["training"]["device"])  # training.device=cuda without a GPU: fail now, not after sampling
    return method


def check_config(cfg: DictConfig, info: FileInfo) -> Method:
    """:func:`check_options`, then what needs the data file ``info``."""
    method = check_options(cfg)
    estimator = cfg.training.estimator
    kind = cfg.sampling.kind
    if estimator == "quadratic_morphing_aware" and info.n_parameters != 1:
        raise UserError(
            f"training.estimator=quadratic_morphing_aware supports exactly 1 parameter but {info.path.name} has "
            f"{info.n_parameters} ({', '.join(info.parameters)}); use a 1-parameter file (data.n_parameters=1 for "
            "the toy) or another estimator"
        )
    if estimator == "morphing_aware" and not info.has_morphing:
        raise UserError(f"training.estimator=morphing_aware needs a morphing setup, {info.path} has none")
    _check_nuisance(cfg, info)
    for key in ("theta0", "theta1") if kind == "ratio" else ("theta",):
        check_theta(cfg.sampling[key], info, f"sampling.{key}")

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
    if isinstance(resolutions, list) and len(resolutions) != info.n_parameters:
        raise UserError(
            f"evaluation.grid.resolutions={resolutions} has {len(resolutions)} entries but {info.path.name} has "
            f"{info.n_parameters} parameters; give one integer >= 2 per parameter, or one for all"
        )
    for var in ev.hist_vars or []:
        _observable(var, info, "evaluation.hist_vars")
    if ev.fisher.observable is not None:
        _observable(ev.fisher.observable, info, "evaluation.fisher.observable")
    if cfg.stage in ("all", "evaluate"):
        grid_ranges(cfg, info)  # a file without parameter ranges needs evaluation.grid.ranges
    return method


def _resolved(cfg: DictConfig) -> dict:
    """The options as plain Python values: interpolations resolved, enums as their names."""
    names = [k for k in cfg if k not in UNRESOLVED]
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, names), resolve=True, enum_to_str=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(f"{key or 'the config'} cannot be resolved ({first_line(err)}); fix the interpolation "
                        "or the value it names") from None


def _check_fields(values: dict, schema: type, prefix: str) -> None:
    """Each option of ``values`` against the field of ``schema`` that declares it: known key, choice, range."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            group = prefix.rstrip(".") or "the config"
            raise UserError(f"{key} is not an option; remove it or fix its name (the options of {group}: "
                            f"{', '.join(fields)})")
        if value is None or name in UNCHECKED:
            continue
        hint = _without_none(hints[name])
        nested = DATA_KINDS.get(value.get("kind")) if schema is Config and name == "data" else hint
        if isinstance(value, dict) and dataclasses.is_dataclass(nested):
            _check_fields(value, nested, f"{key}.")
            continue
        choices = _enum_of(hint)
        entries = value if isinstance(value, list) and typing.get_origin(hint) is list else [value]
        if choices and any(v not in choices for v in entries):
            raise UserError(f"{key}={_shown(value)} is not a choice; use one of: {', '.join(choices)}")
        found = fields[name].metadata.get("range")
        if found is not None and not found.contains(value):
            raise UserError(f"{key}={_shown(value)} is out of range; set {key} to {found.describe()}")


def _shown(value) -> str:
    """A value as it is typed on the command line: true, null, [16, 16]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return f"[{', '.join(_shown(v) for v in value)}]"
    return str(value)


def _without_none(hint):
    """``X | None`` -> ``X``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _enum_of(hint) -> list[str]:
    """The choices of an enum-typed option (or of the entries of a list of enums); [] for other types."""
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return [m.value for m in hint] if isinstance(hint, type) and issubclass(hint, Enum) else []


def _check_toy(data: dict) -> None:
    """The toy's settings, with the generator's own ranges (the events it needs depend on the parameters)."""

    settings = {f.name: data[f.name] for f in dataclasses.fields(ToySettings) if f.name in data}
    try:
        ToySettings(**settings).validate()
    except ValueError as err:
        raise UserError(f"data=toy: data.{first_line(err)}") from None


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


def check_finite(options: dict) -> None:
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

    for key, value in walk(options, ""):
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
        if spec.n is None:
            raise UserError(f"{key}.n is null; type random_morphing_points needs {key}.n, the number of points")
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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(node):
    return OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node
