"""Run the requested stages for one composed config and return the objective.

``config -> stage function -> files in the run dir``: the stages are plain functions; this module
only chooses which to run, times them, reports progress and picks the objective metric.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from app.errors import UserError

log = logging.getLogger("app")

STAGES = ("sample", "train", "evaluate", "plot")
GROUPS = ("experiment", "data", "sampling", "training", "evaluation", "tracking", "hparams_search")


def run(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    _quiet_libraries(cfg.verbose)
    hydra_cfg = HydraConfig.get()
    _share_cores(hydra_cfg)
    cfg = _plain(cfg)
    out_dir = Path(cfg.paths.output_dir)
    stage = cfg.stage
    stages = STAGES if stage == "all" else (stage,)
    choices = hydra_cfg.runtime.choices
    shown = [f"{g}={choices[g]}" for g in GROUPS if choices.get(g) is not None]
    log.info("madminer-sweeper | %s", " ".join(shown))
    log.info("stages: %s | output dir: %s", " -> ".join(stages), out_dir)

    from app import datafile
    from app.validate import check_config

    with _timed("data"):
        info = datafile.resolve(cfg.data, cfg.paths.cache_dir)
        method = check_config(cfg, info)
    from app import metrics as metric_table

    objective = metric_table.objective(cfg.objective.metric, cfg.objective.direction, method.name)
    _check_search_objective(hydra_cfg, objective[0])
    log.info(
        "data: %s (%d events; parameters %s; observables %s)",
        info.path,
        info.n_events,
        ", ".join(info.parameters),
        ", ".join(info.observables),
    )

    from app.io import update_json
    from app.stages import evaluate, plot, sample, train

    # What the tracking callback reads about this job (stages themselves know nothing about MLflow).
    run_file = out_dir / "run.json"
    update_json(run_file, {"data_path": str(info.path.resolve()), "data_sha256": datafile.sha256(info.path),
                           "method": method.name, "stages": list(stages),
                           "objective": {"metric": objective[0], "direction": objective[1]}})

    samples = model = results = None
    metrics: dict = {}
    if "sample" in stages:
        with _timed("sample"):
            samples = sample.run(cfg, method, info, out_dir)
    if "train" in stages:
        if samples is None:
            if not cfg.sampling.samples_dir:
                raise UserError(
                    "stage=train needs training samples; set sampling.samples_dir=<an earlier run>/samples "
                    "(or run stage=all)"
                )
            samples = sample.load(Path(cfg.sampling.samples_dir), method)
        with _timed("train"), _progress(cfg.training.n_epochs) as on_epoch:
            model = train.run(cfg, method, info, samples.samples_dir, out_dir, on_epoch=on_epoch)
        metrics.update(model.metrics)
        if stage == "train":
            update_json(out_dir / "results" / "metrics.json", model.metrics)
    if "evaluate" in stages:
        if model is None:
            if not cfg.training.model_dir:
                raise UserError(
                    "stage=evaluate needs a trained model; set training.model_dir=<an earlier run>/model "
                    "(or run stage=all)"
                )
            model = train.load(Path(cfg.training.model_dir), method)
        with _timed("evaluate"):
            results = evaluate.run(cfg, method, info, model.model_file, out_dir, train_metrics=model.metrics)
        metrics = results.metrics
    if "plot" in stages:
        if results is None:
            if not cfg.evaluation.results_dir:
                raise UserError(
                    "stage=plot needs evaluation results; set evaluation.results_dir=<an earlier run>/results"
                )
            results = evaluate.load(Path(cfg.evaluation.results_dir))
            metrics = results.metrics
        model_dir = (
            model.model_dir if model else (Path(cfg.training.model_dir) if cfg.training.model_dir else None)
        )
        with _timed("plot"):
            plot.run(results.results_dir, model_dir, out_dir, list(info.parameters))

    update_json(run_file, {"reused": {"samples": bool(samples and samples.reused),
                                      "model": bool(model and model.reused)}})
    value = _objective(objective[0], metrics)
    _summary(cfg, out_dir, metrics, objective, value)
    return value


def _objective(name: str, metrics: dict) -> float | None:
    if not metrics:
        return None
    if name not in metrics:
        scalars = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise UserError(
            f"objective.metric={name} is not a metric of this run; choose one of: {', '.join(scalars)}"
        )
    return float(metrics[name])


def _check_search_objective(hydra_cfg, metric: str) -> None:
    """An Optuna search must not rank trials with a number that a tuned parameter itself shifts."""
    from app import metrics as metric_table

    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
    found = metric_table.spec(metric)
    if found is not None and found.scope == "setting" and "training.alpha" in params:
        raise UserError(
            f"objective.metric={metric} depends on training.alpha, which this search tunes (it would favour small "
            "alpha whatever the estimator); use objective.metric=val_<loss term> (e.g. val_improved_xe), "
            "limits_cl68_area or a truth_* metric"
        )


def _summary(cfg: DictConfig, out_dir: Path, metrics: dict, objective: tuple[str, str], value: float | None) -> None:
    log.info("outputs: %s/{samples,model,results,plots}", out_dir)
    keys = ["train_loss", "val_loss"] + sorted(k for k in metrics if k.startswith("val_") and k != "val_loss")
    keys += ["truth_log_r_mse", "truth_score_mse", "truth_log_likelihood_gap", "limits_cl68_area", "truth_limits_iou"]
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
    if shown:
        log.info("metrics: %s", " ".join(shown))
    if value is not None:
        log.info("objective %s = %.6g (%s)", objective[0], value, objective[1])
    if cfg.tracking.mode != "disabled" and cfg.tracking.uri:
        log.info("compare runs: mlflow ui --backend-store-uri %s --host 127.0.0.1", cfg.tracking.uri)


def _plain(cfg: DictConfig) -> DictConfig:
    """The validated config, resolved once, with enum values as plain strings (still read-only to new keys)."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(plain, True)
    return plain


def _share_cores(hydra_cfg) -> None:
    """Parallel jobs of one machine (joblib launcher) split its cores: jobs x threads <= cores.

    Otherwise every job's torch and BLAS use all cores and the jobs slow each other down.
    """
    import os

    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if "joblib" not in target:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=-1) or -1)
    n_jobs = cores if n_jobs <= 0 else n_jobs
    threads = max(1, cores // max(1, n_jobs))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    import torch

    torch.set_num_threads(threads)
    log.info("joblib launcher: %d jobs on %d cores, %d thread(s) per job", n_jobs, cores, threads)


@contextmanager
def _timed(name: str):
    start = time.perf_counter()
    yield
    log.info("stage %-8s done in %6.1f s", name, time.perf_counter() - start)


@contextmanager
def _progress(n_epochs: int):
    """Per-epoch progress: a bar on a terminal, one plain line per epoch in logs and CI."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n_epochs, desc="train", unit="epoch", leave=False)

        def on_epoch(epoch, total, train_loss, val_loss):
            if epoch == 1 and bar.n:
                bar.reset()
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4f}", val="-" if val_loss is None else f"{val_loss:.4f}")

        try:
            yield on_epoch
        finally:
            bar.close()
        return

    def on_epoch(epoch, total, train_loss, val_loss):
        val = "" if val_loss is None else f" val_loss={val_loss:.5f}"
        log.info("epoch %3d/%d train_loss=%.5f%s", epoch, total, train_loss, val)

    yield on_epoch


def _quiet_libraries(verbose: bool) -> None:
    """MadMiner's chatter stays at WARNING (and its NumPy warnings hidden) unless verbose=true."""
    import warnings

    logging.getLogger("madminer").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in ("matplotlib", "h5py", "numexpr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="madminer")
