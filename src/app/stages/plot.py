"""Plot stage: figures from the files of the evaluate and train stages (no MadMiner needed).

Writes into ``<run>/plots``: ``limits.png`` (68 % CL contours of every limit mode on one figure),
``pvalues_<mode>.png`` (p-value map with its 68 % / 95 % CL contours), ``training_curves.png``,
and ``log_r_vs_joint.png`` (ratio methods) or ``score_vs_joint.png`` (score methods).
On a toy file (results with ``truth_*`` arrays) also ``limits_vs_truth.png`` (estimated vs true 68 % CL
contours of every mode on one figure), ``log_r_vs_truth.png`` (ratio and density methods) or
``score_vs_truth.png`` (score methods): 2-D histograms of estimated vs true values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.domain.stats import CL68_P_VALUE, CL95_P_VALUE, q_threshold
from app.store.files import atomic_dir, read_json
from app.toy.truth import refine


def run(results_dir: Path, model_dir: Path | None, out_dir: Path, parameter_names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = out_dir / "plots"
    with atomic_dir(target) as tmp:
        keys = _limit_keys(results_dir)
        if keys:
            grid = np.load(results_dir / "grid.npy")
            truth = np.load(results_dir / "theta_true.npy")
            _limits_overlay(plt, grid, truth, keys, results_dir, parameter_names, tmp / "limits.png")
            for key in keys:
                _pvalue_map(plt, grid, truth, key, results_dir, parameter_names, tmp / f"pvalues_{key}.png")
        meta = (
            read_json(model_dir / "model.json") if model_dir and (model_dir / "model.json").exists() else None
        )
        if meta and meta.get("metrics", {}).get("loss_history"):
            _training_curves(plt, meta, tmp / "training_curves.png")
        if (results_dir / "test_log_r_est.npy").exists():
            _scatter(
                plt,
                np.load(results_dir / "test_log_r_xz.npy"),
                np.load(results_dir / "test_log_r_est.npy"),
                "joint log r(x, z | theta0, theta1)",
                "estimated log r(x | theta0, theta1)",
                tmp / "log_r_vs_joint.png",
            )
        if (results_dir / "test_score_est.npy").exists():
            _scatter(
                plt,
                np.load(results_dir / "test_t_xz.npy").ravel(),
                np.load(results_dir / "test_score_est.npy").ravel(),
                "joint score t(x, z | theta)",
                "estimated score t(x | theta)",
                tmp / "score_vs_joint.png",
            )
        truth_keys = [k for k in keys if (results_dir / f"truth_log_likelihood_{k}.npy").exists()]
        if truth_keys:
            grid = np.load(results_dir / "grid.npy")
            truth = np.load(results_dir / "theta_true.npy")
            _limits_vs_truth(plt, grid, truth, truth_keys, results_dir, parameter_names, tmp / "limits_vs_truth.png")
        for truth_file, estimate_file, what, sample, name in (
            ("truth_log_r_grid", "test_log_r_grid_est", "log r(x | theta, theta_ref)", "test events x evaluation grid",
             "log_r_vs_truth"),
            ("test_score_truth", "test_score_est", "score t(x | theta_ref)", "test events, all components",
             "score_vs_truth"),
        ):
            if (results_dir / f"{truth_file}.npy").exists() and (results_dir / f"{estimate_file}.npy").exists():
                _hist2d(
                    plt,
                    np.load(results_dir / f"{truth_file}.npy").ravel(),
                    np.load(results_dir / f"{estimate_file}.npy").ravel(),
                    f"true {what}",
                    f"estimated {what}",
                    sample,
                    tmp / f"{name}.png",
                )
    return target


def _save(plt, fig, path: Path) -> None:
    """Fixed margins instead of ``tight_layout`` (which lays every figure out in an extra pass: a third of the plot
    stage's time); the labels, titles and colour bars of these figures fit inside them."""
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.11, top=0.93)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _limit_keys(results_dir: Path) -> list[str]:
    limits_file = results_dir / "limits.json"
    if not limits_file.exists():
        return []
    return [
        key for key, _, _ in read_json(limits_file)["runs"] if (results_dir / f"p_values_{key}.npy").exists()
    ]


def _limits_overlay(plt, grid, truth, keys, results_dir, names, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if grid.shape[1] == 1:
        for key in keys:
            ax.plot(grid[:, 0], np.load(results_dir / f"p_values_{key}.npy"), label=key)
        ax.axhline(CL68_P_VALUE, ls=":", c="gray", label="68 % CL")
        ax.set_xlabel(names[0])
        ax.set_ylabel("expected p-value")
    else:
        xs, ys, shape = _mesh(grid)
        for i, key in enumerate(keys):
            p = np.load(results_dir / f"p_values_{key}.npy").reshape(shape)
            color = f"C{i}"
            ax.contour(xs, ys, p, levels=[CL68_P_VALUE], colors=[color])
            best = np.load(results_dir / f"best_fit_{key}.npy")
            ax.plot([best[0]], [best[1]], marker="+", color=color, ls="", label=f"{key} (68 % CL, best fit)")
        ax.plot([truth[0]], [truth[1]], marker="*", c="k", ls="", label="theta true")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.legend(fontsize=8)
    ax.set_title("Expected limits")
    _save(plt, fig, path)


def _pvalue_map(plt, grid, truth, key, results_dir, names, path: Path) -> None:
    p = np.load(results_dir / f"p_values_{key}.npy")
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if grid.shape[1] == 1:
        ax.plot(grid[:, 0], p)
        ax.axhline(CL68_P_VALUE, ls=":", c="gray")
        ax.set_xlabel(names[0])
        ax.set_ylabel("expected p-value")
    else:
        xs, ys, shape = _mesh(grid)
        mesh = ax.pcolormesh(xs, ys, p.reshape(shape), shading="auto", vmin=0, vmax=1, cmap="viridis")
        ax.contour(
            xs,
            ys,
            p.reshape(shape),
            levels=[CL95_P_VALUE, CL68_P_VALUE],
            colors=["w", "w"],
            linestyles=["--", "-"],
        )
        ax.plot([truth[0]], [truth[1]], marker="*", c="r", ls="")
        fig.colorbar(mesh, ax=ax, label="expected p-value")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.set_title(f"{key}: 68 % (solid) and 95 % (dashed) CL")
    _save(plt, fig, path)


def _mesh(grid: np.ndarray):
    """MadMiner's grid varies the last parameter fastest: reshape to (n0, n1)."""
    xs = np.unique(grid[:, 0])
    ys = np.unique(grid[:, 1])
    shape = (len(xs), len(ys))
    return grid[:, 0].reshape(shape), grid[:, 1].reshape(shape), shape


def _training_curves(plt, meta: dict, path: Path) -> None:
    history = meta["metrics"]["loss_history"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    epochs = [e["epoch"] for e in history]
    ax.plot(epochs, [e["train_loss"] for e in history], label="train")
    if all("val_loss" in e for e in history):
        ax.plot(epochs, [e["val_loss"] for e in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{meta['method']} ({meta['estimator']})")
    ax.legend()
    _save(plt, fig, path)


def _scatter(plt, joint, estimated, xlabel: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(joint, estimated, s=4, alpha=0.4)
    finite = np.isfinite(joint) & np.isfinite(estimated)
    if finite.any():
        lo = float(np.percentile(np.concatenate([joint[finite], estimated[finite]]), 1))
        hi = float(np.percentile(np.concatenate([joint[finite], estimated[finite]]), 99))
        ax.plot([lo, hi], [lo, hi], c="k", ls=":")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save(plt, fig, path)


def _limits_vs_truth(plt, grid, truth, keys, results_dir, names, path: Path) -> None:
    """Estimated (solid) vs true (dashed) 68 % CL regions of every mode, on the refined grid of the IoU metric."""
    from matplotlib.lines import Line2D

    threshold = q_threshold(dof=grid.shape[1])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    handles = []
    inside_all = []
    for i, key in enumerate(keys):
        color = f"C{i}"
        curves = []
        for name in (f"log_likelihood_{key}.npy", f"truth_log_likelihood_{key}.npy"):
            fine, log_l = refine(grid, np.load(results_dir / name))
            curves.append(-2.0 * (log_l - log_l.max()))
        if grid.shape[1] == 1:
            from scipy.stats import chi2

            for q, ls in zip(curves, ("-", "--")):
                ax.plot(fine[:, 0], chi2.sf(q, 1), c=color, ls=ls)
                inside_all.append(fine[q < 9.0])  # within 3 sigma: what the zoom shows
        else:
            xs, ys = np.unique(fine[:, 0]), np.unique(fine[:, 1])
            for q, ls in zip(curves, ("-", "--")):
                ax.contour(xs, ys, q.reshape(len(xs), len(ys)).T, levels=[threshold], colors=[color], linestyles=[ls])
                inside_all.append(fine[q < threshold])
        handles.append(Line2D([], [], c=color, label=key))
    handles += [Line2D([], [], c="k", ls="-", label="estimated"), Line2D([], [], c="k", ls="--", label="truth")]
    # zoom onto the regions (they are often smaller than a cell of the evaluation grid)
    points = np.vstack(inside_all + [np.reshape(truth, (1, -1))])
    spacing = [np.ptp(grid[:, i]) / max(1, len(np.unique(grid[:, i])) - 1) for i in range(grid.shape[1])]
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = np.maximum(0.3 * (hi - lo), spacing)
    ax.set_xlim(max(grid[:, 0].min(), lo[0] - pad[0]), min(grid[:, 0].max(), hi[0] + pad[0]))
    if grid.shape[1] == 1:
        ax.axhline(CL68_P_VALUE, ls=":", c="gray")
        ax.axvline(truth[0], ls=":", c="k")
        ax.set_xlabel(names[0])
        ax.set_ylabel("expected p-value")
    else:
        ax.plot([truth[0]], [truth[1]], marker="*", c="k", ls="")
        ax.set_ylim(max(grid[:, 1].min(), lo[1] - pad[1]), min(grid[:, 1].max(), hi[1] + pad[1]))
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("68 % CL: estimated vs true likelihood")
    _save(plt, fig, path)


def _hist2d(plt, true, estimated, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.5, 5))
    finite = np.isfinite(true) & np.isfinite(estimated)
    true, estimated = true[finite], estimated[finite]
    if len(true):
        both = np.concatenate([true, estimated])
        lo, hi = float(np.percentile(both, 0.1)), float(np.percentile(both, 99.9))
        hi = hi if hi > lo else lo + 1.0
        _, _, _, mesh = ax.hist2d(true, estimated, bins=80, range=[[lo, hi], [lo, hi]], norm=LogNorm(), cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="entries")
        ax.plot([lo, hi], [lo, hi], c="r", ls=":", lw=1)
        mse = float(np.mean((estimated - true) ** 2))
        ax.text(0.03, 0.95, f"MSE {mse:.3g}", transform=ax.transAxes, va="top", color="k")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _save(plt, fig, path)
