r"""The embedded default data: a small, deterministic, valid MadMiner event file.

The file is written with MadMiner's own API (``madminer.core.MadMiner`` for parameters, benchmarks
and morphing; ``madminer.utils.interfaces.hdf5.save_events`` for the events) and mimics the real
physics sample (``CWL2``/``CPWL2`` in LHA block ``dim6``, observables ``pt_j1``/``delta_phi_jj``,
benchmarks ``sm``, ``w``, ``morphing_basis_vector_2`` ..), so the same configs run on both.

Generative model
----------------
Everything below is implemented by the vectorised functions of this module; a "ground truth"
feature can compute exact likelihoods (ratios) from them.

* Latent ("parton level") z = (z1, z2) in R^2, base density phi(z1) phi(z2) (standard normals).
* Couplings: a(theta) = (theta0 / C0, theta1 / C1), C0 = 3, C1 = 4. With one parameter
  a(theta) = (theta0 / C0, 0). [:func:`couplings`]
* Squared amplitude: A(z, theta) = (1 + a(theta).z)^2 + DELTA, DELTA = 0.25. [:func:`amplitude_squared`]
* Differential cross section (pb):
  dsigma/dz (theta) = SIGMA_SM / (1 + DELTA) * phi(z1) phi(z2) * A(z, theta), SIGMA_SM = 0.006.
  [:func:`differential_cross_section`]
  It is quadratic in theta, so MadMiner's morphing with max power 2 (6 components for two
  parameters, 3 for one) reproduces it exactly.
* Total cross section: sigma(theta) = SIGMA_SM * (1 + |a(theta)|^2 + DELTA) / (1 + DELTA).
  [:func:`cross_section`]
* Latent density: p(z | theta) = dsigma/dz / sigma = phi(z1) phi(z2) A(z, theta) / (1 + |a|^2 + DELTA).
  [:func:`latent_density`]
* Detector smearing: x'_i = z_i + s * eps_i, eps ~ N(0, 1), s = ``smearing`` (s = 0 gives x' = z).
  [:func:`smear`]
  Closed form of the smeared density (Gaussian convolution of a Gaussian times a quadratic):
  with m = x' / (1 + s^2) and tau^2 = s^2 / (1 + s^2),
  p(x' | theta) = N(x'_1; 0, 1 + s^2) N(x'_2; 0, 1 + s^2)
                  * [(1 + a.m)^2 + tau^2 |a|^2 + DELTA] / (1 + |a|^2 + DELTA).   [:func:`smeared_density`]
* Observables (monotone maps, so likelihood ratios are the same in x and x'):
  pt_j1 = PT_SCALE * exp(PT_SLOPE * x'_1) with PT_SCALE = 150, PT_SLOPE = 0.6; delta_phi_jj = x'_2.
  [:func:`observables_from_smeared`, :func:`smeared_from_observables`]
  p(x | theta) = p(x' | theta) / (PT_SLOPE * pt_j1).   [:func:`observables_density`]

Event generation (MadMiner's convention, as if MadGraph had run once per benchmark)
---------------------------------------------------------------------------------
* n_events is split over the B benchmarks: n_b = n_events // B each, the remainder to the first.
* Benchmark b's n_b events are drawn exactly from p(z | theta_b) [:func:`sample_latent`]: rotate to
  u = a_hat.z and v perpendicular to it; v ~ N(0, 1); u has density prop. to
  phi(u) [(1 + k u)^2 + DELTA], k = |a|. |u| comes from the even part, a mixture of |N(0, 1)|
  (probability (1 + DELTA) / (1 + DELTA + k^2)) and a chi distribution with 3 degrees of freedom
  (probability k^2 / (1 + DELTA + k^2)); u is positive with probability
  1/2 + k|u| / (1 + DELTA + k^2 u^2). For k = 0 this is just z ~ N(0, I).
* The weight of such an event for benchmark column c [:func:`event_weights`]:
  w_c = (sigma_b / n_b) * A(z, theta_c) / A(z, theta_b),
  so each per-run subset sums to sigma_c in expectation: what MadMiner's
  ``sample_only_from_closest_benchmark`` and its sampling factors n_b / N assume.
* ``sampling_benchmarks`` = b per event, ``num_signal_events`` = [n_b, ..], no background.
  Events are shuffled (MadMiner splits train/test by index).
* Nuisance variant (``nuisance=True``, ``data.nuisance=true``): one nuisance parameter nu, a shape
  systematic declared as MadMiner declares a scale variation (``MadMiner.add_systematics("scale", "scale")``,
  scale factors 0.5 / 2): nuisance parameter ``scale_nuisance_param_0`` with the benchmarks
  ``scale_nuisance_param_0_benchmark_0`` (nu = +1) and ``.._benchmark_1`` (nu = -1), saved with
  ``save_nuisance_setup`` and stored as two extra weight columns, rescaled to the reference benchmark (sm) as
  MadMiner's LHE reader does: w_+- = w_sm * exp(+-NUISANCE_KAPPA * x'_1) [:func:`nuisance_weights`]. MadMiner's
  NuisanceMorpher then gives dsigma(x | theta, nu) = dsigma(x | theta, 0) * exp(nu * NUISANCE_KAPPA * x'_1)
  exactly (its a = kappa x'_1, b = 0): a tilt of the pt_j1 spectrum. The physics weights (and so the truth at
  nu = 0) are those of the plain toy with the same settings; the extra columns use no randomness.
* All event-level randomness comes from ``numpy.random.default_rng(seed)`` in a fixed order
  (latent draws per benchmark, smearing noise, shuffle). ``set_morphing`` draws from NumPy's global
  RNG; it is seeded from ``seed`` and the global state is restored afterwards. A file is therefore
  a deterministic function of :class:`ToySettings`.

This module imports only NumPy at import time; madminer and h5py are imported where needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- constants
FORMAT_VERSION = "1"  # bump whenever the generated content changes: it is part of the cache key

C0 = 3.0  # theta0 / C0 is the first coupling
C1 = 4.0  # theta1 / C1 is the second coupling
DELTA = 0.25  # theta-independent term of the squared amplitude
SIGMA_SM = 0.006  # pb, the SM cross section
PT_SCALE = 150.0  # pt_j1 = PT_SCALE * exp(PT_SLOPE * x'_1)
PT_SLOPE = 0.6

PARAMETER_NAMES = ("CWL2", "CPWL2")
LHA_BLOCK = "dim6"
LHA_IDS = (2, 5)
PARAM_CARD_TRANSFORM = "16.52*theta"  # as in the real physics sample; only MadGraph cards would use it
MAX_POWER = 2
PARAMETER_RANGE = (-10.0, 10.0)
BENCHMARK_SM = "sm"
BENCHMARK_W = "w"
W_VALUE = 10.0  # benchmark "w" sits at (W_VALUE, 0)
OBSERVABLE_NAMES = ("pt_j1", "delta_phi_jj")
# Stored as observables/definitions. They must be valid Python expressions (madminer eval()s them and
# only tolerates NameError); they document the transform, nothing evaluates them.
OBSERVABLE_DEFINITIONS = (f"{PT_SCALE} * exp({PT_SLOPE} * toy_xprime_1)", "toy_xprime_2")

MORPHING_N_TRIALS = 100
MORPHING_N_TEST_THETAS = 100
MIN_EVENTS_PER_BENCHMARK = 10
# Nuisance variant: a shape systematic declared as MadMiner's scale variation (see the module docstring)
NUISANCE_SYSTEMATIC = "scale"
NUISANCE_SCALE_VARIATIONS = (0.5, 1.0, 2.0)
NUISANCE_PARAMETER = f"{NUISANCE_SYSTEMATIC}_nuisance_param_0"  # MadMiner's LHE reader's names
NUISANCE_BENCHMARKS = (f"{NUISANCE_PARAMETER}_benchmark_0", f"{NUISANCE_PARAMETER}_benchmark_1")  # nu = +1, -1
NUISANCE_KAPPA = 0.3  # dsigma(x | theta, nu) = dsigma(x | theta, 0) * exp(nu * NUISANCE_KAPPA * x'_1)
SETTINGS_ATTR = "app_toy_settings"  # root attribute of the HDF5 file: JSON of the settings + format version


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ToySettings:
    n_events: int = 20000
    seed: int = 1234
    n_parameters: int = 2  # 1 or 2
    smearing: float = 0.5
    nuisance: bool = False  # add one nuisance parameter (a shape systematic; see the module docstring)

    def validate(self) -> ToySettings:
        """Raise ``ValueError`` (one line: the problem and the fix) for unusable settings; return self."""
        if not _is_int(self.n_parameters) or self.n_parameters not in (1, 2):
            raise ValueError(f"n_parameters={self.n_parameters!r} is not supported; use n_parameters=1 or 2")
        if not _is_int(self.n_events):
            raise ValueError(f"n_events={self.n_events!r} is not an integer; use a whole number of events")
        n_min = MIN_EVENTS_PER_BENCHMARK * n_benchmarks(self.n_parameters)
        if self.n_events < n_min:
            raise ValueError(
                f"n_events={self.n_events} is too small for {n_benchmarks(self.n_parameters)} benchmarks; "
                f"use n_events >= {n_min} ({MIN_EVENTS_PER_BENCHMARK} events per benchmark)"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is not a non-negative integer; use e.g. seed=1234")
        if isinstance(self.smearing, bool) or not isinstance(self.smearing, (int, float, np.number)):
            raise ValueError(f"smearing={self.smearing!r} is not a number; use a float >= 0, e.g. 0.5")
        if not np.isfinite(self.smearing) or self.smearing < 0:
            raise ValueError(f"smearing={self.smearing!r} is invalid; use a finite float >= 0 (0 = none)")
        if not isinstance(self.nuisance, (bool, np.bool_)):
            raise ValueError(f"nuisance={self.nuisance!r} is not a boolean; use nuisance=true or false")
        return self

    def canonical(self) -> dict:
        """Settings with normalised types (so ``smearing=0`` and ``smearing=0.0`` are the same file).

        ``nuisance`` appears only when true: the plain toy keeps its cache key (and file) of before the variant.
        """
        settings = {
            "n_events": int(self.n_events),
            "seed": int(self.seed),
            "n_parameters": int(self.n_parameters),
            "smearing": float(self.smearing),
        }
        if self.nuisance:
            settings["nuisance"] = True
        return settings


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def n_benchmarks(n_parameters: int) -> int:
    """Number of morphing components = benchmarks for max power 2: 3 for one parameter, 6 for two."""
    return (n_parameters + 1) * (n_parameters + 2) // 2


def settings_key(settings: ToySettings) -> str:
    """Full sha256 hex digest of the canonical settings and :data:`FORMAT_VERSION`."""
    payload = json.dumps({**settings.canonical(), "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- the model
def couplings(theta) -> np.ndarray:
    """a(theta), shape (..., 2), for theta of shape (..., n_parameters) with n_parameters in {1, 2}."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim == 0 or theta.shape[-1] not in (1, 2):
        raise ValueError(f"theta must have shape (..., 1) or (..., 2), got {theta.shape}")
    a = np.zeros(theta.shape[:-1] + (2,))
    a[..., 0] = theta[..., 0] / C0
    if theta.shape[-1] == 2:
        a[..., 1] = theta[..., 1] / C1
    return a


def amplitude_squared(z, theta) -> np.ndarray:
    """A(z, theta) = (1 + a(theta).z)^2 + DELTA; z (..., 2) and theta (..., n_parameters) broadcast."""
    z = np.asarray(z, dtype=np.float64)
    return (1.0 + np.sum(couplings(theta) * z, axis=-1)) ** 2 + DELTA


def _normal_pdf(x) -> np.ndarray:
    return np.exp(-0.5 * np.square(x)) / np.sqrt(2.0 * np.pi)


def differential_cross_section(z, theta) -> np.ndarray:
    """dsigma/dz in pb: SIGMA_SM / (1 + DELTA) * phi(z1) phi(z2) * A(z, theta)."""
    z = np.asarray(z, dtype=np.float64)
    base = _normal_pdf(z[..., 0]) * _normal_pdf(z[..., 1])
    return SIGMA_SM / (1.0 + DELTA) * base * amplitude_squared(z, theta)


def cross_section(theta) -> np.ndarray:
    """sigma(theta) in pb, shape theta.shape[:-1]: SIGMA_SM * (1 + |a|^2 + DELTA) / (1 + DELTA)."""
    a = couplings(theta)
    return SIGMA_SM * (1.0 + np.sum(a * a, axis=-1) + DELTA) / (1.0 + DELTA)


def latent_density(z, theta) -> np.ndarray:
    """p(z | theta) = dsigma/dz / sigma."""
    return differential_cross_section(z, theta) / cross_section(theta)


def smeared_density(xprime, theta, smearing: float) -> np.ndarray:
    """p(x' | theta) in closed form (see the module docstring); equals latent_density for smearing=0."""
    xprime = np.asarray(xprime, dtype=np.float64)
    var = 1.0 + float(smearing) ** 2
    tau2 = float(smearing) ** 2 / var
    a = couplings(theta)
    a2 = np.sum(a * a, axis=-1)
    m = xprime / var
    base = _normal_pdf(xprime[..., 0] / np.sqrt(var)) * _normal_pdf(xprime[..., 1] / np.sqrt(var)) / var
    poly = (1.0 + np.sum(a * m, axis=-1)) ** 2 + tau2 * a2 + DELTA
    return base * poly / (1.0 + a2 + DELTA)


def observables_from_smeared(xprime) -> np.ndarray:
    """x = (pt_j1, delta_phi_jj) = (PT_SCALE * exp(PT_SLOPE * x'_1), x'_2); shape (..., 2)."""
    xprime = np.asarray(xprime, dtype=np.float64)
    return np.stack([PT_SCALE * np.exp(PT_SLOPE * xprime[..., 0]), xprime[..., 1]], axis=-1)


def smeared_from_observables(x) -> np.ndarray:
    """Inverse of :func:`observables_from_smeared`."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([np.log(x[..., 0] / PT_SCALE) / PT_SLOPE, x[..., 1]], axis=-1)


def observables_density(x, theta, smearing: float) -> np.ndarray:
    """p(x | theta) for observables x = (pt_j1, delta_phi_jj): p(x' | theta) / (PT_SLOPE * pt_j1)."""
    x = np.asarray(x, dtype=np.float64)
    return smeared_density(smeared_from_observables(x), theta, smearing) / (PT_SLOPE * x[..., 0])


def sample_latent(theta, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n latent points z ~ p(z | theta) exactly (no rejection); theta is one point, returns (n, 2)."""
    a = couplings(np.asarray(theta, dtype=np.float64).reshape(-1))
    k = float(np.hypot(a[0], a[1]))
    if k == 0.0:
        return rng.standard_normal((n, 2))
    a_hat = a / k
    perp = np.array([-a_hat[1], a_hat[0]])
    norm = 1.0 + DELTA + k * k
    use_chi3 = rng.random(n) < k * k / norm
    half_normal = np.abs(rng.standard_normal(n))
    chi3 = np.sqrt(rng.chisquare(3, n))
    abs_u = np.where(use_chi3, chi3, half_normal)
    p_plus = 0.5 + k * abs_u / (1.0 + DELTA + k * k * abs_u**2)
    u = np.where(rng.random(n) < p_plus, abs_u, -abs_u)
    v = rng.standard_normal(n)
    return u[:, None] * a_hat[None, :] + v[:, None] * perp[None, :]


def smear(z, smearing: float, rng: np.random.Generator) -> np.ndarray:
    """x' = z + smearing * eps; always draws eps, so z is the same for every smearing at a given seed."""
    z = np.asarray(z, dtype=np.float64)
    return z + float(smearing) * rng.standard_normal(z.shape)


def split_events(n_events: int, n_bench: int) -> np.ndarray:
    """Events per benchmark run: n_events // n_bench each, the remainder to the first."""
    n_b = np.full(n_bench, n_events // n_bench, dtype=np.int64)
    n_b[0] += n_events - n_b.sum()
    return n_b


def event_weights(z, sampling_ids, benchmark_thetas, n_per_benchmark, thetas=None) -> np.ndarray:
    """Weights (n_events, n_thetas): (sigma_b / n_b) * A(z, theta) / A(z, theta_b), b = sampling id.

    ``thetas`` defaults to ``benchmark_thetas`` (the stored weight columns); pass other points to get
    the exact weights MadMiner's morphing should reproduce there.
    """
    z = np.asarray(z, dtype=np.float64)
    ids = np.asarray(sampling_ids, dtype=np.int64)
    benchmark_thetas = np.asarray(benchmark_thetas, dtype=np.float64)
    thetas = benchmark_thetas if thetas is None else np.asarray(thetas, dtype=np.float64)
    per_event = cross_section(benchmark_thetas) / np.asarray(n_per_benchmark, dtype=np.float64)
    numerator = amplitude_squared(z[:, None, :], thetas[None, :, :])
    denominator = amplitude_squared(z, benchmark_thetas[ids])
    return per_event[ids][:, None] * numerator / denominator[:, None]


def nuisance_weights(xprime, weights_sm) -> np.ndarray:
    """The nuisance benchmarks' weight columns (n_events, 2): w_sm * exp(+-NUISANCE_KAPPA * x'_1), nu = +1, -1.

    As MadMiner's LHE reader stores them: rescaled to the reference benchmark (sm), whatever the event's sampling
    benchmark, so that MadMiner's NuisanceMorpher reads a(x) = 0.5 log(w_+ / w_-) = kappa x'_1 and b(x) = 0.
    """
    tilt = NUISANCE_KAPPA * np.asarray(xprime, dtype=np.float64)[:, 0]
    weights_sm = np.asarray(weights_sm, dtype=np.float64)
    return np.stack([weights_sm * np.exp(tilt), weights_sm * np.exp(-tilt)], axis=1)


@dataclass(frozen=True)
class ToyEvents:
    """One simulated sample, in file order (shuffled)."""

    z: np.ndarray  # (n, 2) latent
    xprime: np.ndarray  # (n, 2) smeared latent
    observations: np.ndarray  # (n, 2): pt_j1, delta_phi_jj
    weights: np.ndarray  # (n, n_benchmarks) in pb
    sampling_ids: np.ndarray  # (n,) index of the benchmark each event was generated at
    n_per_benchmark: np.ndarray  # (n_benchmarks,)


def simulate_events(settings: ToySettings, benchmark_thetas) -> ToyEvents:
    """The events of a toy file, given the benchmark points (rows in the file's benchmark order)."""
    settings.validate()
    benchmark_thetas = np.asarray(benchmark_thetas, dtype=np.float64)
    rng = np.random.default_rng(int(settings.seed))
    n_b = split_events(int(settings.n_events), len(benchmark_thetas))
    z = np.concatenate([sample_latent(theta, n, rng) for theta, n in zip(benchmark_thetas, n_b)])
    ids = np.repeat(np.arange(len(benchmark_thetas)), n_b)
    xprime = smear(z, settings.smearing, rng)
    order = rng.permutation(len(z))
    z, xprime, ids = z[order], xprime[order], ids[order]
    return ToyEvents(
        z=z,
        xprime=xprime,
        observations=observables_from_smeared(xprime),
        weights=event_weights(z, ids, benchmark_thetas, n_b),
        sampling_ids=ids,
        n_per_benchmark=n_b,
    )


# --------------------------------------------------------------------------- MadMiner setup and file
def build_miner(settings: ToySettings):
    """A ``madminer.core.MadMiner`` with the parameters, benchmarks and (seeded) morphing basis."""
    from madminer.core import MadMiner

    settings.validate()
    names = PARAMETER_NAMES[: settings.n_parameters]
    miner = MadMiner()
    core_log = logging.getLogger("madminer.core.madminer")
    level = core_log.level
    core_log.setLevel(logging.ERROR)  # add_parameter warns "Resetting benchmarks and morphing" each time
    try:
        for name, lha_id in zip(names, LHA_IDS):
            miner.add_parameter(
                lha_block=LHA_BLOCK,
                lha_id=lha_id,
                parameter_name=name,
                param_card_transform=PARAM_CARD_TRANSFORM,
                morphing_max_power=MAX_POWER,
                parameter_range=PARAMETER_RANGE,
            )
    finally:
        core_log.setLevel(level)
    origin = {name: 0.0 for name in names}
    miner.add_benchmark(origin, BENCHMARK_SM)
    miner.add_benchmark({**origin, names[0]: W_VALUE}, BENCHMARK_W)
    state = np.random.get_state()
    try:
        np.random.seed(int(settings.seed) % 2**32)
        miner.set_morphing(
            max_overall_power=MAX_POWER,
            include_existing_benchmarks=True,
            n_trials=MORPHING_N_TRIALS,
            n_test_thetas=MORPHING_N_TEST_THETAS,
        )
    finally:
        np.random.set_state(state)
    if settings.nuisance:
        miner.add_systematics(
            "scale", systematic_name=NUISANCE_SYSTEMATIC, scale="mu", scale_variations=NUISANCE_SCALE_VARIATIONS
        )
    return miner


def benchmark_thetas_of(miner) -> tuple[list[str], np.ndarray]:
    """Benchmark names and points (n_benchmarks, n_parameters) of a MadMiner object, in file order."""
    names = list(miner.benchmarks)
    params = list(miner.parameters)
    thetas = np.array([[float(miner.benchmarks[b].values[p]) for p in params] for b in names])
    return names, thetas


def generate_toy_file(settings: ToySettings, path) -> Path:
    """(Re)generate the toy file at ``path``; written to a temporary file next to it, then renamed."""
    import h5py
    from madminer.models import NuisanceParameter, Observable
    from madminer.utils.interfaces.hdf5 import save_events, save_nuisance_setup

    settings.validate()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    miner = build_miner(settings)
    names, thetas = benchmark_thetas_of(miner)
    events = simulate_events(settings, thetas)

    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        miner.save(str(tmp))
        weights = {n: events.weights[:, i] for i, n in enumerate(names)}
        nuisance = {}
        if settings.nuisance:
            extra = nuisance_weights(events.xprime, weights[BENCHMARK_SM])
            weights.update({n: extra[:, i] for i, n in enumerate(NUISANCE_BENCHMARKS)})
            nuisance = {
                NUISANCE_PARAMETER: NuisanceParameter(NUISANCE_PARAMETER, NUISANCE_SYSTEMATIC, *NUISANCE_BENCHMARKS)
            }
        # As MadMiner's LHE/Delphes readers do: flag the reference benchmark (here the SM), add the nuisance
        # benchmarks (flagged is_nuisance) and parameters.
        save_nuisance_setup(str(tmp), True, list(weights), nuisance, reference_benchmark=BENCHMARK_SM)
        save_events(
            file_name=str(tmp),
            file_override=True,
            observables={n: Observable(n, d) for n, d in zip(OBSERVABLE_NAMES, OBSERVABLE_DEFINITIONS)},
            observations={n: events.observations[:, i] for i, n in enumerate(OBSERVABLE_NAMES)},
            weights=weights,
            sampling_benchmarks=events.sampling_ids,
            num_signal_events=events.n_per_benchmark,
            num_background_events=0,
        )
        with h5py.File(tmp, "a") as f:
            f.attrs[SETTINGS_ATTR] = _settings_attr(settings)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _settings_attr(settings: ToySettings) -> str:
    return json.dumps({**settings.canonical(), "format_version": FORMAT_VERSION}, sort_keys=True)


def read_toy_settings(path) -> dict | None:
    """The settings (+ format_version) a toy file was generated with; None if it is not a toy file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get(SETTINGS_ATTR)
    except OSError:
        return None
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))


def toy_file_path(settings: ToySettings, cache_dir) -> Path:
    """Content-addressed location: ``<cache_dir>/toy/toy-<12 hex>.h5``."""
    return Path(cache_dir).expanduser() / "toy" / f"toy-{settings_key(settings)[:12]}.h5"


def ensure_toy_file(settings: ToySettings, cache_dir, path=None) -> Path:
    """Return the toy file for ``settings``, generating it only if it is missing.

    Without ``path`` the file lives at :func:`toy_file_path` and an existing file is reused as is.
    With ``path`` an existing file is reused if it was generated with the same settings, regenerated
    if it is a toy file for other settings, and refused (``ValueError``) if it is anything else.
    """
    settings.validate()
    if path is None:
        target = toy_file_path(settings, cache_dir)
        if target.is_file():
            return target
        return generate_toy_file(settings, target)

    target = Path(path).expanduser()
    if target.exists():
        stored = read_toy_settings(target) if target.is_file() else None
        if stored is None:
            raise ValueError(
                f"{target} exists and is not a toy file written by app.toy.simulator; "
                "delete it or set the toy path to a new file (or null for the cache)"
            )
        if stored == json.loads(_settings_attr(settings)):
            return target
    return generate_toy_file(settings, target)
