"""Plot stage: figures from the files of the evaluate and train stages (no MadMiner needed).

Writes into ``<run>/plots``: ``limits.png`` (68 % CL contours of every limit mode on one figure),
``pvalues_<mode>.png`` (p-value map with its 68 % / 95 % CL contours), ``training_curves.png``,
and ``log_r_vs_joint.png`` (ratio methods) or ``score_vs_joint.png`` (score methods).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.io import atomic_dir, read_json

CL68_P_VALUE = 1.0 - 0.6826894921370859
CL95_P_VALUE = 1.0 - 0.9544997361036416


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
    return target


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
