"""Confidence levels shared by evaluation, plots, truth and the sweep comparison; regions, correlations and the
ensemble spread of a metric."""

CL68 = 0.6826894921370859  # one Gaussian sigma
CL95 = 0.9544997361036416  # two Gaussian sigma
CL68_P_VALUE = 1.0 - CL68  # a grid point with a larger p-value lies inside the 68 % CL region
CL95_P_VALUE = 1.0 - CL95


def region_size(grid, p_values, threshold: float = CL68_P_VALUE, upsample: int = 8) -> float:
    """Size (length, area, volume) of the region ``p > threshold`` in parameter units.

    ``grid`` holds the points of a regular grid (any order; rows are points), ``p_values`` one value per point.
    The p-values are interpolated (multilinear) onto a grid ``upsample`` times finer and the region's size is the
    fraction of fine cells whose centres lie inside, times the grid's volume: not a count of coarse cells.
    """
    import numpy as np
    from scipy.interpolate import RegularGridInterpolator

    grid = np.asarray(grid, dtype=float)
    p = np.asarray(p_values, dtype=float).ravel()
    axes = [np.unique(grid[:, i]) for i in range(grid.shape[1])]
    if any(len(a) < 2 for a in axes):
        return 0.0
    values = np.full([len(a) for a in axes], np.nan)
    index = tuple(np.searchsorted(a, grid[:, i]) for i, a in enumerate(axes))
    values[index] = p
    interpolate = RegularGridInterpolator(axes, values)
    centres = []
    for a in axes:
        edges = np.linspace(a[0], a[-1], upsample * (len(a) - 1) + 1)
        centres.append(0.5 * (edges[1:] + edges[:-1]))
    mesh = np.stack(np.meshgrid(*centres, indexing="ij"), axis=-1).reshape(-1, len(axes))
    inside = interpolate(mesh) > threshold
    volume = float(np.prod([a[-1] - a[0] for a in axes]))
    return float(np.mean(inside)) * volume


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
