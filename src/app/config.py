"""The typed config: one dataclass per config group, each numeric option with its valid range.

``conf/config.yaml`` starts from :class:`Config` (``base_config`` in Hydra's ConfigStore), so every YAML
option of the groups ``sampling``, ``training``, ``evaluation`` and ``tracking`` merges into a typed node:
a wrong type, an unknown key or a value outside an enum fails when Hydra composes the config, and the
defaults live here only. ``data`` has one schema per kind (toy, file), which its YAML options pull in.
Nothing else is registered: Hydra deep-copies the whole ConfigStore once per config group that
``--help`` lists (about a hundred copies), so each registered schema costs every ``--help``.

Ranges: a numeric option declared with :func:`ranged` carries its :class:`Range` in the field's metadata;
:func:`app.domain.validate.check_options` walks these dataclasses and rejects a value outside it in one
line, before any stage work. This module imports only Hydra/OmegaConf: it stays on the cheap
``--help`` / ``--cfg`` path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from app.domain.methods import ESTIMATORS, LIMIT_MODES


class Stage(StrEnum):
    all = "all"
    sample = "sample"
    train = "train"
    evaluate = "evaluate"
    plot = "plot"


class ThetaType(StrEnum):
    benchmark = "benchmark"
    benchmarks = "benchmarks"
    morphing_point = "morphing_point"
    morphing_points = "morphing_points"
    random_morphing_points = "random_morphing_points"


class SamplingKind(StrEnum):
    ratio = "ratio"
    local = "local"
    density = "density"


# Derived from the methods table (app.domain.methods), the one list of estimators and limit modes.
EstimatorKind = StrEnum("EstimatorKind", {name: name for name in ESTIMATORS})


class Optimizer(StrEnum):
    adam = "adam"
    amsgrad = "amsgrad"
    sgd = "sgd"


class Activation(StrEnum):
    tanh = "tanh"
    relu = "relu"
    sigmoid = "sigmoid"
    lrelu = "lrelu"
    elu = "elu"
    selu = "selu"
    softplus = "softplus"


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


# Config spelling (adaptive_sally); app.domain.methods.LIMIT_MODES maps it onto MadMiner's (adaptive-sally).
LimitMode = StrEnum("LimitMode", {name: name for name in LIMIT_MODES})


class Direction(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


class TrackingMode(StrEnum):
    local = "local"
    server = "server"
    disabled = "disabled"


class Trainer(StrEnum):
    fast = "fast"  # app.ml.fasttrain's loop
    madminer = "madminer"  # MadMiner's own Trainer


# --------------------------------------------------------------------------- ranges
SEED_MAX = 2**32 - 1  # NumPy's legacy seeding (MadMiner's sampling) takes 0 <= seed < 2**32


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option.

    ``low``/``high``: the bounds (inclusive unless ``low_open``/``high_open``); ``integer``: a whole number;
    ``shape``: ``one`` number, a ``list`` of one or more numbers each in range, ``one_or_list`` of them,
    ``bins``: a number of bins in range or a list of two or more increasing bin edges, or ``bins_per_axis``:
    ``bins`` or a list of them, one per histogram axis. ``null`` is valid where the field's type allows it
    (``... | None``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    shape: str = "one"

    def contains(self, value: Any) -> bool:
        many = isinstance(value, list)
        if self.shape == "one":
            return self._number(value)
        if self.shape == "list":
            return many and len(value) > 0 and all(self._number(v) for v in value)
        if self.shape == "one_or_list":
            return (len(value) > 0 and all(self._number(v) for v in value)) if many else self._number(value)
        if self.shape == "bins":
            return self._bins(value)
        return (len(value) > 0 and all(self._bins(v) for v in value)) if many else self._bins(value)  # per axis

    def _number(self, value: Any) -> bool:
        if not _is_number(value) or (self.integer and not isinstance(value, int)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def _bins(self, value: Any) -> bool:
        """A number of bins in range, or two or more increasing bin edges."""
        if not isinstance(value, list):
            return self._number(value)
        return len(value) >= 2 and all(_is_number(v) for v in value) and all(a < b for a, b in zip(value, value[1:]))

    def describe(self) -> str:
        """'an integer >= 1', 'a number in [0, 1)', 'a list of one or more integers >= 1', ..."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            bounds = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            bounds = ""
        one = f"{'an integer' if self.integer else 'a number'} {bounds}".strip()
        many = f"{'integers' if self.integer else 'numbers'} {bounds}".strip()
        return {
            "one": one,
            "list": f"a list of one or more {many}",
            "one_or_list": f"{one} or a list of such",
            "bins": f"{one} (the number of bins) or a list of two or more increasing bin edges",
            "bins_per_axis": f"{one} (the number of bins) or a list with one entry per histogram axis, each "
                             f"{one} or a list of two or more increasing bin edges",
        }[self.shape]


def ranged(default: Any = MISSING, *, factory=None, **bounds) -> Any:
    """A dataclass field whose value must lie in ``Range(**bounds)``."""
    metadata = {"range": Range(**bounds)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------- data
@dataclass
class ToyDataConfig:
    """The embedded default: a MadMiner file generated by ``app.toy.simulator`` (cached by its settings).

    Its ranges are the generator's own (``app.toy.simulator.ToySettings.validate``: the events a benchmark
    needs depend on the number of parameters), checked with the other options before any work.
    """

    kind: str = "toy"
    path: str | None = None  # null = content-addressed file under paths.cache_dir
    n_events: int = 20000
    seed: int = 1234
    n_parameters: int = 2
    smearing: float = 0.5
    nuisance: bool = False  # true: add one nuisance parameter (a shape systematic, app.toy.simulator; docs/toy.md)


@dataclass
class FileDataConfig:
    """An existing MadMiner HDF5 event file."""

    kind: str = "file"
    path: str = MISSING


DATA_KINDS = {"toy": ToyDataConfig, "file": FileDataConfig}  # data.kind -> its schema


# --------------------------------------------------------------------------- sampling
@dataclass
class ThetaSpec:
    """Where to sample theta; maps one to one onto madminer.sampling's helpers."""

    type: ThetaType = ThetaType.benchmark
    name: str | None = None  # benchmark
    names: list[str] | None = None  # benchmarks
    values: Any = None  # morphing_point: [..]; morphing_points: [[..], ..]
    n: int | None = ranged(None, low=1, integer=True)  # random_morphing_points
    priors: Any = None  # random_morphing_points: [[gaussian, mean, std] | [flat, lo, hi], ...]


@dataclass
class SamplingConfig:
    """One schema for the three kinds: ratio reads theta0/theta1, local and density read theta.

    An experiment may set all three (each method uses the ones of its kind).
    """

    kind: SamplingKind = MISSING
    theta0: ThetaSpec | None = None
    theta1: ThetaSpec | None = None
    theta: ThetaSpec | None = None
    n_samples: int = ranged(10000, low=1, integer=True)
    # drawn from the validation partition; null = n_samples // 4
    n_validation_samples: int | None = ranged(None, low=1, integer=True)
    test_split: float = ranged(0.2, low=0, high=1, low_open=True, high_open=True)
    validation_split: float = ranged(0.2, low=0, high=1, high_open=True)  # events reserved for validation samples
    # theta sets drawn on this many processes: the same samples for any value (madminer_patches.seeded_sets)
    n_processes: int = ranged(1, low=1, integer=True)
    include_nuisance: bool = False
    sample_only_from_closest_benchmark: bool = True
    seed: int = ranged(1, low=0, high=SEED_MAX, integer=True)
    samples_dir: str | None = None  # reuse samples of an earlier run instead of sampling


# --------------------------------------------------------------------------- training
@dataclass
class TrainingConfig:
    method: str = MISSING
    estimator: EstimatorKind = MISSING
    n_estimators: int = ranged(1, low=1, integer=True)
    n_hidden: list[int] = ranged(factory=lambda: [50, 50], low=1, integer=True, shape="list")  # units per layer
    activation: Activation = Activation.tanh
    dropout_prob: float = ranged(0.0, low=0, high=1, high_open=True)
    alpha: float = ranged(1.0, low=0)  # weight of the score term(s) of the loss
    optimizer: Optimizer = Optimizer.amsgrad
    n_epochs: int = ranged(20, low=1, integer=True)
    batch_size: int = ranged(128, low=1, integer=True)
    initial_lr: float = ranged(0.001, low=0, low_open=True)
    final_lr: float = ranged(0.0001, low=0, low_open=True)
    # 0 = validate on samples from MadMiner's validation partition (sampling.validation_split); > 0 = MadMiner's
    # in-sample split of the training samples (an opt-out: they are drawn with replacement, so it leaks)
    validation_split: float = ranged(0.0, low=0, high=1, high_open=True)
    early_stopping: bool = True
    scale_inputs: bool = True
    clip_gradient: float | None = ranged(None, low=0, low_open=True)  # null = no clipping
    n_workers: int = ranged(0, low=0, integer=True)  # 0 = load batches in the main process
    device: Device = Device.auto
    trainer: Trainer = Trainer.fast
    # fast trainer on CUDA: each training step replayed from one CUDA graph (app.ml.graphs; the plain loop elsewhere)
    compile: bool = False
    # density estimators (nde, scandal): MADE / MAF settings
    n_mades: int = ranged(3, low=1, integer=True)
    n_components: int = ranged(1, low=1, integer=True)
    model_dir: str | None = None  # reuse a trained model of an earlier run instead of training


# --------------------------------------------------------------------------- evaluation
@dataclass
class GridConfig:
    # [[min, max], ...] one pair per parameter; null = half the parameter ranges stored in the file. Typed Any (and
    # checked in app.domain.validate) because OmegaConf refuses integers in a nested list[list[float]]:
    # [[-1, 1], [-1, 1]]
    ranges: Any = None
    resolutions: Any = ranged(25, low=2, integer=True, shape="one_or_list")  # int, or one int per parameter


@dataclass
class FisherConfig:
    enabled: bool = True
    observable: str | None = None  # null = first observable of the file
    # int, or a list of bin edges; one bin would only measure the rate (fisher_rate_* has that)
    bins: Any = ranged(10, low=2, integer=True, shape="bins")


@dataclass
class EvaluationConfig:
    modes: list[LimitMode] | None = None  # null = rate, histo and the method's own mode
    grid: GridConfig = field(default_factory=GridConfig)
    theta_true: list[float] | None = None  # null = the file's "sm" benchmark (the origin if it has none)
    # integrated luminosity in pb^-1 (10000 pb^-1 = 10 fb^-1)
    luminosity: float = ranged(10000.0, low=0, low_open=True)
    include_xsec: Any = True  # bool, or [true, false] to evaluate the kinematic modes both ways
    hist_vars: list[str] | None = None  # null = first observable of the file
    # null = MadMiner's default; int or a list (one entry per histogram axis); one bin would be the rate mode again
    hist_bins: Any = ranged(None, low=2, integer=True, shape="bins_per_axis")
    n_test_samples: int = ranged(1000, low=1, integer=True)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    truth: bool = True  # toy files only: compare estimator and limits with the exact likelihood (app.toy.truth)
    results_dir: str | None = None  # for stage=plot: results of an earlier run


# --------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    mode: TrackingMode = TrackingMode.local
    uri: str | None = None
    experiment_name: str = "madminer-sweeper"
    register_model: bool = False
    background: bool = True  # MLflow calls in a helper process, off the jobs' critical path (app.tracking.helper)
    # MLflow's system metrics (CPU, memory; GPUs with pynvml) logged into each job's run (app.tracking.calls)
    system_metrics: bool = False


# --------------------------------------------------------------------------- top level
@dataclass
class PathsConfig:
    cache_dir: str = "${oc.env:MADMINER_SWEEPER_CACHE,.cache/madminer-sweeper}"
    output_dir: str | None = "${hydra:runtime.output_dir}"


@dataclass
class CacheConfig:
    """The stage cache under paths.cache_dir (app.store.cache): samples, models and results keyed by what made them.
    ``python -m app.store info|clear`` shows or empties it."""

    enabled: bool = True


@dataclass
class ObjectiveConfig:
    metric: str | None = None  # null = the method's alpha-independent validation term (app.domain.metrics)
    direction: Direction | None = None  # null = the metric's own direction (app.domain.metrics)


@dataclass
class SearchConfig:
    """What this job is to an Optuna search: set by ``hydra/sweeper=tolerant_optuna`` (with a pruner and a stored
    study), not by hand. ``trial``: the trial's number; the job reports each epoch to it (app.sweeps.pruning)."""

    trial: int | None = ranged(None, low=0, integer=True)


@dataclass
class Config:
    data: Any = MISSING
    sampling: SamplingConfig = MISSING
    training: TrainingConfig = MISSING
    evaluation: EvaluationConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    stage: Stage = Stage.all
    seed: int = ranged(42, low=0, high=SEED_MAX, integer=True)
    verbose: bool = False
    # Free-form values for experiments to interpolate, e.g. per-method settings:
    # training.n_epochs: ${vars.${training.method}.n_epochs}
    vars: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register what the YAML options need and nothing more (every entry is deep-copied per ``--help`` group).

    ``base_config`` types the groups (conf/config.yaml starts from it); the data kinds are top-level entries,
    not a group, so that ``--help`` lists only the groups a user chooses from.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for kind, node in DATA_KINDS.items():
        cs.store(name=f"{kind}_data_schema", node=node)  # conf/data/KIND.yaml: - /KIND_data_schema@_here_
