"""Confidence levels shared by evaluation, plots, truth and the sweep comparison; CL regions of a log-likelihood on a
grid (spline-interpolated), correlations and the ensemble spread of a metric."""

from dataclasses import dataclass

CL68 = 0.6826894921370859  # one Gaussian sigma
CL95 = 0.9544997361036416  # two Gaussian sigma
CL68_P_VALUE = 1.0 - CL68  # a grid point with a larger p-value lies inside the 68 % CL region
CL95_P_VALUE = 1.0 - CL95


def grid_axes(grid) -> list:
    """The axes (sorted unique values per parameter) of a regular grid whose rows are points."""
    import numpy as np

    grid = np.asarray(grid, dtype=np.float64)
    axes = [np.unique(grid[:, i]) for i in range(grid.shape[1])]
    if grid.ndim != 2 or np.prod([len(a) for a in axes]) != len(grid):
        raise ValueError("a regular grid as made by MadMiner's AsymptoticLimits is needed")
    return axes


def grid_spline(grid, values):
    """Cubic-spline interpolant (linear where an axis has fewer than 4 points) of values on a regular grid
    (MadMiner's order: the last parameter varies fastest); returns f(axes) -> values on their mesh, raveled.
    Three or more parameters: SciPy's tensor-product cubic interpolation (linear below 4 points per axis)."""
    import numpy as np

    grid = np.asarray(grid, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    axes = grid_axes(grid)
    if grid.shape[1] == 1:
        from scipy.interpolate import make_interp_spline

        order = np.argsort(grid[:, 0])
        spline = make_interp_spline(grid[order, 0], values[order], k=min(3, len(axes[0]) - 1))
        return lambda new_axes: spline(new_axes[0])
    if grid.shape[1] > 2:
        from scipy.interpolate import RegularGridInterpolator

        order = np.lexsort(grid.T[::-1])  # MadMiner's order, whatever the rows' order
        method = "cubic" if min(len(a) for a in axes) >= 4 else "linear"
        cube = RegularGridInterpolator(axes, values[order].reshape([len(a) for a in axes]), method=method)
        return lambda new_axes: cube(mesh(new_axes))
    from scipy.interpolate import RectBivariateSpline

    spline = RectBivariateSpline(
        axes[0],
        axes[1],
        values.reshape(len(axes[0]), len(axes[1])),
        kx=min(3, len(axes[0]) - 1),
        ky=min(3, len(axes[1]) - 1),
    )
    return lambda new_axes: spline(*new_axes).ravel()


def mesh(axes):
    """The points of the regular grid with these axes, as rows (the last axis varies fastest)."""
    import numpy as np

    return np.stack([m.ravel() for m in np.meshgrid(*axes, indexing="ij")], axis=1)


def q_threshold(cl: float = CL68, dof: int = 2) -> float:
    """-2 log r below which a point lies inside the CL region (p-value > 1 - cl)."""
    from scipy.stats import chi2

    return float(chi2.ppf(cl, df=dof))


@dataclass(frozen=True)
class Regions:
    """CL regions of log-likelihoods on one zoomed grid (:func:`cl_regions`)."""

    points: object  # (n, dof) the zoomed grid's points
    values: list  # per log L: its spline on ``points``
    inside: list  # per log L: boolean mask of ``points`` inside its region
    cell: float  # length / area of one zoomed cell
    touches_edge: list  # per log L: whether its region reaches the evaluation grid's boundary

    def size(self, i: int = 0) -> float:
        return float(self.inside[i].sum()) * self.cell


def cl_regions(grid, log_likelihoods, cl: float = CL68, n_zoom: int | None = None) -> Regions:
    """The regions {theta: -2 [log L(theta) - max log L] < chi2_ppf(cl, dof = number of parameters)} (MadMiner's
    p-value > 1 - cl) of each log L (any constant offset) given on a regular evaluation grid.

    Each log L is interpolated with a cubic spline (smooth where log L is: a Gaussian log L is a quadratic, which
    the spline reproduces; p-values interpolated linearly are not). The regions are located on an 8x finer grid,
    then counted on an ``n_zoom``-point-per-axis grid spanning their union plus one grid spacing, so regions smaller
    than a grid cell are resolved (default: 241 points per axis for one or two parameters; coarser with more:
    a 2x finer grid and 41 points). A region that reaches the grid's boundary continues beyond it: its size is only
    a lower bound (``touches_edge``). Non-finite values count as far outside.
    """
    import numpy as np

    grid = np.asarray(grid, dtype=np.float64)
    few = grid.shape[1] <= 2
    n_zoom = n_zoom or (241 if few else 41)
    factor = 8 if few else 2
    threshold = q_threshold(cl, grid.shape[1])
    axes = grid_axes(grid)
    splines = []
    for v in log_likelihoods:
        v = np.broadcast_to(np.asarray(v, dtype=np.float64), (len(grid),))
        finite = np.isfinite(v)
        v = np.where(finite, v, np.min(v[finite]) - 1e3 * threshold if finite.any() else 0.0)
        splines.append(grid_spline(grid, v))

    def regions(new_axes):
        values = [f(new_axes) for f in splines]
        return values, [-2.0 * (v - v.max()) < threshold for v in values]

    fine_axes = [np.linspace(a[0], a[-1], (len(a) - 1) * factor + 1) if len(a) > 1 else a for a in axes]
    _, inside = regions(fine_axes)
    shape = [len(a) for a in fine_axes]
    touches = []
    for mask in inside:
        cube = mask.reshape(shape)
        touches.append(any(np.take(cube, [0, -1], axis=i).any() for i, n in enumerate(shape) if n > 1))
    points = mesh(fine_axes)[np.logical_or.reduce(inside)]
    zoom_axes = []
    for i, a in enumerate(axes):
        step = (a[-1] - a[0]) / max(1, len(a) - 1)
        lo, hi = max(a[0], points[:, i].min() - step), min(a[-1], points[:, i].max() + step)
        zoom_axes.append(np.linspace(lo, hi, n_zoom) if hi > lo else np.array([lo]))
    values, inside = regions(zoom_axes)
    cell = float(np.prod([(z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 else 0.0 for z in zoom_axes]))
    return Regions(mesh(zoom_axes), values, inside, cell, touches)


def correlation(a, b) -> float:
    """Pearson correlation of two samples; 0 when either is constant."""
    import numpy as np

    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def with_spread(compute, predictions: list) -> dict:
    """``compute(mean prediction)``; for an ensemble (several member predictions) also every metric's
    spread over the members, ``<metric>_ensemble_std`` (std of the metric computed per member)."""
    import numpy as np

    metrics = compute(np.mean(predictions, axis=0))
    if len(predictions) > 1:
        per_member = [compute(p) for p in predictions]
        for key in list(metrics):
            metrics[f"{key}_ensemble_std"] = float(np.std([m[key] for m in per_member]))
    return metrics
