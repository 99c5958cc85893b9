"""Where in parameter space: theta specs as MadMiner's sampling helpers, theta_true, the file's benchmarks and the
evaluation grid. Read by validation, the sample and evaluate stages and the evaluation modules.

A theta spec (``sampling.theta0``, ``sampling.theta``, ...) maps one to one onto ``madminer.sampling``'s helper of
the same name (:func:`to_madminer_theta`). The evaluation grid is the one MadMiner's AsymptoticLimits builds from
``evaluation.grid`` (:func:`theta_grid_of`).
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.domain.datafile import FileInfo
from app.errors import UserError

SM = "sm"  # the benchmark evaluation.theta_true=null stands for
SINGLE_POINT_TYPES = ("benchmark", "morphing_point")


# --------------------------------------------------------------------------- theta specs
def to_madminer_theta(spec: DictConfig):
    """Map a theta spec onto madminer.sampling's helper of the same name."""
    from madminer import sampling

    kind = spec.type
    if kind == "benchmark":
        return sampling.benchmark(spec.name)
    if kind == "benchmarks":
        return sampling.benchmarks(list(spec.names))
    if kind == "morphing_point":
        return sampling.morphing_point(list(spec["values"]))
    if kind == "morphing_points":
        return sampling.morphing_points([list(v) for v in spec["values"]])
    if kind == "random_morphing_points":
        priors = [tuple(p) for p in OmegaConf.to_container(spec.priors)]
        return sampling.random_morphing_points(spec.n, priors)
    raise UserError(f"unknown theta type {kind}")


def to_madminer_point(theta: np.ndarray):
    """One parameter point as MadMiner's ``morphing_point``."""
    from madminer.sampling import morphing_point

    return morphing_point(theta.tolist())


def is_single_point(spec) -> bool:
    return spec.type in SINGLE_POINT_TYPES


def double_theta1_spec(cfg: DictConfig, info: FileInfo):
    """theta1 for a double-parameterized estimator when sampling.theta1 is one point: theta0's spec when
    that has several points, else 20 points drawn flat over the file's parameter ranges."""
    s = cfg.sampling
    if not is_single_point(s.theta0):
        return s.theta0
    priors = [["flat", float(lo), float(hi)] for lo, hi in info.parameter_ranges]
    return OmegaConf.create({"type": "random_morphing_points", "n": 20, "priors": priors})


def ratio_theta1(cfg: DictConfig, info: FileInfo):
    """MadMiner's theta1 for ratio sampling (training and test): ``sampling.theta1``, except that a
    double-parameterized estimator must see theta1 vary (:func:`double_theta1_spec`)."""
    s = cfg.sampling
    if cfg.training.estimator == "double_parameterized" and is_single_point(s.theta1):
        return to_madminer_theta(double_theta1_spec(cfg, info))
    return to_madminer_theta(s.theta1)


def training_point(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """The point a score estimator was trained at (``sampling.theta``): SALLINO's / adaptive SALLY's thetaref."""
    spec = cfg.sampling.theta
    if spec.type == "benchmark":
        return benchmark_points(info)[spec.name]
    if spec.type == "morphing_point":
        return np.asarray(list(spec["values"]), dtype=float)
    raise UserError(
        f"sampling.theta of type {spec.type} is not one point; score methods train at one point "
        "(type benchmark or morphing_point)"
    )


def single_point(thetas) -> np.ndarray | None:
    """The one parameter point all rows of ``thetas`` share, or None."""
    thetas = np.asarray(thetas, dtype=np.float64)
    if len(thetas) == 0 or not np.allclose(thetas, thetas[0], rtol=1e-6, atol=1e-6):
        return None
    return thetas[0]


# --------------------------------------------------------------------------- the file's points
def benchmark_points(info: FileInfo) -> dict[str, np.ndarray]:
    """The file's (physics) benchmarks, by name: the named theta of the truth_log_r_mse_at_<name> metrics."""
    import h5py

    with h5py.File(info.path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["benchmarks/names"][()]]
        values = f["benchmarks/values"][()]
        nuisance = f["benchmarks/is_nuisance"][()] if "benchmarks/is_nuisance" in f else np.zeros(len(names))
    return {n: np.asarray(v, dtype=np.float64) for n, v, nu in zip(names, values, nuisance) if not nu}


def theta_true(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """``evaluation.theta_true``; null = the file's ``sm`` benchmark, the origin if it has none."""
    t = cfg.evaluation.theta_true
    if t is not None:
        return np.asarray(list(t), dtype=float)
    return benchmark_points(info).get(SM, np.zeros(info.n_parameters))


def describe_theta_true(cfg: DictConfig, info: FileInfo) -> str:
    """Where theta_true comes from, for the one log line of the evaluate stage."""
    point = np.round(theta_true(cfg, info), 4).tolist()
    if cfg.evaluation.theta_true is not None:
        return f"theta_true = {point} (evaluation.theta_true)"
    if SM in benchmark_points(info):
        return f"theta_true = {point} (the file's {SM!r} benchmark; evaluation.theta_true=null)"
    return f"theta_true = {point} (the origin: the file has no {SM!r} benchmark; set evaluation.theta_true)"


# --------------------------------------------------------------------------- the evaluation grid
def grid_ranges(cfg: DictConfig, info: FileInfo) -> list[tuple[float, float]]:
    """``evaluation.grid.ranges``; null = half the parameter ranges stored in the file or, for a file
    without them, the span of its benchmarks. UserError when neither defines a range."""
    ranges = cfg.evaluation.grid.ranges
    if ranges is not None:
        return [tuple(map(float, r)) for r in ranges]
    stored = _stored_parameter_ranges(info)
    if stored is not None:
        return [(0.5 * lo, 0.5 * hi) for lo, hi in stored]
    values = np.array(list(benchmark_points(info).values()), dtype=float).reshape(-1, info.n_parameters)
    spans = [(float(lo), float(hi)) for lo, hi in zip(values.min(axis=0), values.max(axis=0))]
    flat = [name for name, (lo, hi) in zip(info.parameters, spans) if not lo < hi]
    if flat:
        raise UserError(
            f"{info.path.name} stores no parameter ranges and its benchmarks do not span {', '.join(flat)}; "
            f"set evaluation.grid.ranges (one [min, max] per parameter: {', '.join(info.parameters)})"
        )
    return spans


def _stored_parameter_ranges(info: FileInfo) -> list[tuple[float, float]] | None:
    import h5py

    with h5py.File(info.path, "r") as f:
        if "parameters/val_ranges" not in f:
            return None
        return [tuple(map(float, r)) for r in f["parameters/val_ranges"][()]]


def grid_resolutions(cfg: DictConfig, info: FileInfo) -> list[int]:
    resolutions = OmegaConf.to_container(cfg.evaluation.grid, resolve=True)["resolutions"]
    if isinstance(resolutions, int):  # madminer 0.9.6 only handles the list form
        resolutions = [resolutions] * info.n_parameters
    return resolutions


def theta_grid_of(cfg: DictConfig, info: FileInfo) -> np.ndarray:
    """The evaluation grid exactly as AsymptoticLimits builds it (last parameter varies fastest)."""
    from madminer.limits import AsymptoticLimits

    return AsymptoticLimits._make_theta_grid(grid_ranges(cfg, info), grid_resolutions(cfg, info))[0]
