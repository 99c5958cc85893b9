"""The parent run's comparison of a sweep: a CSV of every child, the best child, and plots."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from app.domain import metrics
from app.domain.stats import CL68_P_VALUE
from app.tracking import backend


def children(c, parent: dict) -> list:
    return c.search_runs(
        [parent["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'",
        max_results=10000,
    )


def summarise_sweep(c, parent: dict, metric: str | None, direction: str | None) -> str | None:
    """Log the comparison artifacts and best-child tags on the parent; returns the best child's run id.

    ``metric`` / ``direction``: the sweep's ``objective`` (null: each child's own default, its method's loss term)."""

    runs = sorted(children(c, parent), key=lambda r: int(r.data.tags.get("job.num", 0) or 0))
    if not runs:
        raise RuntimeError("the sweep has no child runs")
    param_keys = sorted({k for r in runs for k in r.data.params})
    varied = [k for k in param_keys if len({r.data.params.get(k) for r in runs}) > 1]
    metric_keys = sorted({k for r in runs for k in r.data.metrics if not k.startswith("epoch_")})
    rows = []
    for r in runs:
        row = {
            "run_id": r.info.run_id,
            "run_name": r.data.tags.get("mlflow.runName"),
            "job_num": r.data.tags.get("job.num"),
            "status": r.info.status,
            "overrides": r.data.tags.get("overrides"),
        }
        row.update({k: r.data.params.get(k) for k in varied})
        row.update({k: r.data.metrics.get(k) for k in metric_keys})
        rows.append(row)

    best, per_method, metric, direction, reason = pick_best(runs, metric, direction)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "comparison.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        summary = {
            "objective": metric,
            "direction": direction,
            "n_children": len(runs),
            "n_finished": sum(r.info.status == "FINISHED" for r in runs),
            "n_failed": sum(r.info.status == "FAILED" for r in runs),
            "n_pruned": sum(r.data.tags.get("optuna.trial_state") == "PRUNED" for r in runs),
            "varied_params": varied,
            "comparable": best is not None,
            "why": reason,
            "best_run_id": best.info.run_id if best else None,
            "best_run_name": best.data.tags.get("mlflow.runName") if best else None,
            "best_objective": best.data.metrics[metric] if best else None,
            "best_per_method": {
                m: {"run_id": r.info.run_id, "run_name": r.data.tags.get("mlflow.runName"),
                    "metric": _objective_of(r, metric), "value": r.data.metrics[_objective_of(r, metric)]}
                for m, r in per_method.items()
            },
        }
        (tmp / "best.json").write_text(json.dumps(summary, indent=2))
        _objective_plot(runs, metric or "objective", best, tmp / "objective.png")
        if len({r.data.tags.get("training") for r in runs}) > 1:
            methods_overlay(runs, tmp / "limits_by_method.png")
        c.log_artifacts(parent["run_id"], str(tmp), "comparison")

    tags = {"n_children": len(runs), "n_failed": summary["n_failed"], "n_pruned": summary["n_pruned"],
            "comparison": reason}
    failed = [f"failed: job {r.data.tags.get('job.num', '?')} [{r.data.tags.get('overrides', '')}]: "
              f"{r.data.tags.get('error', '?')}" for r in runs if r.info.status == "FAILED"]
    if failed:
        tags["failed_jobs"] = "; ".join(failed)
    if best:
        tags.update({"best_run_id": best.info.run_id, "best_run_name": summary["best_run_name"]})
        backend.log_metrics(c, parent["run_id"], [(f"best_{metric}", best.data.metrics[metric], 0)])
    for m, r in per_method.items():
        tags[f"best_run_name.{m}"] = r.data.tags.get("mlflow.runName")
    backend.set_tags(c, parent["run_id"], tags)
    return best.info.run_id if best else None


def _objective_of(run, metric: str | None) -> str | None:
    return metric or run.data.tags.get("objective.metric")


def pick_best(runs, metric: str | None, direction: str | None):
    """(best run or None, best run per method, metric, direction, why) under app.domain.metrics' comparability rules.

    ``metric=None``: each child was scored with its own method's default objective; one metric for all children is
    needed for a cross-trial best.
    """

    finished = [r for r in runs if r.info.status == "FINISHED" and _objective_of(r, metric) in r.data.metrics]
    children = [_child(r, _objective_of(r, metric), direction) for r in finished]
    overall, best_of, why = metrics.rank(children)
    names = {c.metric for c in children}
    name = names.pop() if len(names) == 1 else None
    if name is None:  # each method with its own default objective
        metric_direction = None
    else:
        metric_direction = direction or metrics.spec(name).direction
    by_id = {r.info.run_id: r for r in finished}
    best = by_id[overall.run_id] if overall else None
    return best, {m: by_id[ch.run_id] for m, ch in best_of.items()}, name or metric, metric_direction, why


def _child(run, metric: str, direction: str | None):

    params = run.data.params
    sampling = {k: v for k, v in params.items() if k.startswith(("sampling.", "data.")) and k != "sampling.samples_dir"}
    samples_key = run.data.tags.get("cache.sample.key") or json.dumps(sampling, sort_keys=True)
    return metrics.Child(run.info.run_id, params.get("training.method"), run.data.metrics[metric],
                         params.get("training.alpha"), samples_key, metric,
                         direction or metrics.spec(metric).direction)


def warm_plots() -> None:
    """matplotlib's import and first figure (its font cache): ~0.45 s that the comparison at the very end of a sweep
    would otherwise wait for; the MLflow helper does it while the jobs run. A failure only costs the warm-up."""
    import io

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title("warm-up")
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    except Exception:  # noqa: BLE001 - the comparison that needs it reports any error
        pass


def _objective_plot(runs, metric: str, best, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(i, r.data.metrics[metric], r) for i, r in enumerate(runs) if metric in r.data.metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=metric)
        if best is not None:
            i = next(p[0] for p in points if p[2].info.run_id == best.info.run_id)
            ax.plot([i], [best.data.metrics[metric]], "*", ms=14, c="C3", label="best")
        ax.set_xticks([p[0] for p in points], [p[2].data.tags.get("mlflow.runName", "") for p in points],
                      rotation=30, ha="right", fontsize=8)
        ax.legend()
    ax.set_ylabel(metric)
    ax.set_title("objective per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def methods_overlay(runs, path: Path) -> None:
    """Each method's 68 % CL contour in its own mode, with the rate and histogram baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    baselines_drawn = False
    names: list[str] = []
    for i, r in enumerate(runs):
        results = Path(r.data.tags.get("output_dir", "")) / "results"
        run_file = results.parent / "run.json"
        if not names and run_file.exists():
            names = json.loads(run_file.read_text()).get("parameters") or []
        limits_file = results / "limits.json"
        if r.info.status != "FINISHED" or not limits_file.exists():
            continue
        grid = np.load(results / "grid.npy")
        if grid.shape[1] != 2:
            continue
        xs, ys = np.unique(grid[:, 0]), np.unique(grid[:, 1])
        shape = (len(xs), len(ys))
        keys = [k for k, mode, _ in json.loads(limits_file.read_text())["runs"] if mode not in ("rate", "histo")]
        baselines = [] if baselines_drawn else ["rate", "histo"]
        for key, style in [(k, "--") for k in baselines] + [(k, "-") for k in keys[:1]]:
            p_file = results / f"p_values_{key}.npy"
            if not p_file.exists():
                continue
            p = np.load(p_file).reshape(shape)
            label = key if key in ("rate", "histo") else f"{r.data.tags.get('training')} ({key})"
            color = "gray" if key == "rate" else ("k" if key == "histo" else f"C{i}")
            ax.contour(grid[:, 0].reshape(shape), grid[:, 1].reshape(shape), p, levels=[CL68_P_VALUE],
                       colors=[color], linestyles=[style])
            ax.plot([], [], c=color, ls=style, label=label)
        baselines_drawn = True
    if len(names) == 2:
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.set_title("68 % CL expected limits by method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
