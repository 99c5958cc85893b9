"""Run the requested stages for one composed config and return the objective.

``config -> stage function -> files in the run dir``: the stages are plain functions; this module
only chooses which to run, times them, reports progress and picks the objective metric.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from app.domain import datafile
from app.domain import metrics as metric_table
from app.domain.validate import check_config, check_options
from app.errors import Pruned, UserError
from app.ml import device
from app.stages import evaluate, plot, sample, train
from app.store import cache, provenance
from app.store.files import atomic_dir, read_json, update_json
from app.toy.truth import ToyTruth

log = logging.getLogger("app")

STAGES = ("sample", "train", "evaluate", "plot")
GROUPS = ("experiment", "data", "sampling", "training", "evaluation", "tracking", "hparams_search")


def run(cfg: DictConfig, on_record=None) -> float | None:
    """``on_record(entry, objective)``: every training epoch's record and the objective's name (a search's pruner
    reports it to its trial and raises :class:`app.errors.Pruned` to stop the job: then ``results/metrics.json``
    holds the epochs trained and ``run.json`` says ``pruned``, and nothing is evaluated)."""
    _quiet_libraries(cfg.verbose)
    hydra_cfg = HydraConfig.get()
    _share_cores(hydra_cfg)
    cfg = resolved(cfg)
    out_dir = Path(cfg.paths.output_dir)
    stage = cfg.stage
    stages = STAGES if stage == "all" else (stage,)
    choices = hydra_cfg.runtime.choices
    shown = [f"{g}={choices[g]}" for g in GROUPS if choices.get(g) is not None]
    log.info("madminer-sweeper | %s", " ".join(shown))
    log.info("stages: %s | output dir: %s", " -> ".join(stages), out_dir)

    check_options(cfg)  # every option, before the toy file is made or read (the file's own checks follow)
    with _timed("data"):
        info = datafile.resolve(cfg.data, cfg.paths.cache_dir)
        method = check_config(cfg, info)
    objective = metric_table.objective(cfg.objective.metric, cfg.objective.direction, method.name)
    _check_search_objective(hydra_cfg, objective[0])
    if "evaluate" in stages:
        _check_truth_objective(cfg, info, objective[0])
    log.info(
        "data: %s (%d events; parameters %s; observables %s)",
        info.path,
        info.n_events,
        ", ".join(info.parameters),
        ", ".join(info.observables),
    )

    # What the tracking callback reads about this job (stages themselves know nothing about MLflow).
    run_file = out_dir / "run.json"
    digest = cache.file_digest(info.path, cfg.paths.cache_dir)
    update_json(run_file, {"data_path": str(info.path.resolve()), "data_sha256": digest,
                           "method": method.name, "stages": list(stages), "parameters": list(info.parameters),
                           "objective": {"metric": objective[0], "direction": objective[1]}})
    producer = {"output_dir": str(out_dir), "mlflow_run_id": (read_json(run_file) or {}).get("mlflow_run_id")}
    ctx = _Stages(cfg, method, info, out_dir, digest, producer)

    # Each stage's input is the folder the user gave (checked), or the upstream stage's output, taken from the
    # stage cache or computed: stage=train alone samples once per sampling setting, stage=evaluate trains once.
    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = _get(name)
        return loaded[name]

    def _get(name: str):
        if ctx.is_given(name):
            folder = ctx.given(name)
        elif name == "sample":
            with _timed("sample"):
                folder = ctx.produce("sample", lambda tmp: sample.run(cfg, method, info, tmp))
        elif name == "train":
            samples_dir = get("sample").samples_dir
            with _timed("train"), _progress(cfg.training.n_epochs) as on_epoch:
                record = None if on_record is None else (lambda entry: on_record(entry, objective[0]))
                folder = ctx.produce(
                    "train",
                    lambda tmp: train.run(cfg, method, info, samples_dir, tmp, on_epoch=on_epoch, on_record=record),
                )
        else:
            model = get("train")
            with _timed("evaluate"):
                folder = ctx.produce(
                    "evaluate",
                    lambda tmp: evaluate.run(cfg, method, info, model.model_file, tmp, train_metrics=model.metrics,
                                             memo=ctx.memo),
                )
        if name == "sample":
            return sample.load(folder, method)
        return train.load(folder, method) if name == "train" else evaluate.load(folder)

    # one GPU per job (app.ml.device.job_gpu): jobs of a sweep running at once on a node each take their own
    with device.job_gpu(cfg.training.device, _gpu_slots(hydra_cfg), _job_num(hydra_cfg)) as gpu:
        if gpu is not None:
            update_json(run_file, {"gpu": gpu})  # the tracking callback records it as tags
        metrics: dict = {}
        if "sample" in stages:
            get("sample")
        if "train" in stages:
            try:
                metrics = dict(get("train").metrics)
            except Pruned as err:  # the epochs trained are this job's record; nothing to evaluate
                update_json(out_dir / "results" / "metrics.json",
                            {"loss_history": err.history, "n_epochs_trained": err.epoch})
                update_json(run_file, {"pruned": {"epoch": err.epoch}})
                log.info("training stopped by the search's pruner after epoch %d: no evaluation", err.epoch)
                raise
            if stage == "train":
                update_json(out_dir / "results" / "metrics.json", metrics)
        if "evaluate" in stages or "plot" in stages:
            results = get("evaluate")
            metrics = results.metrics
        if "plot" in stages:
            model_dir = loaded["train"].model_dir if "train" in loaded else (
                Path(cfg.training.model_dir) if cfg.training.model_dir else None)
            with _timed("plot"):
                ctx.plots(lambda target: plot.run(results.results_dir, model_dir, target, list(info.parameters)))

    update_json(run_file, {"cache": ctx.record,
                           "reused": {"samples": ctx.reused("sample"), "model": ctx.reused("train")}})
    value = _objective(objective[0], metrics)
    _summary(out_dir, metrics, objective, value)
    return value


class _Stages:
    """Runs a stage through the stage cache (or takes the folder the user gave), and records what happened."""

    def __init__(self, cfg: DictConfig, method, info, out_dir: Path, digest: str, producer: dict) -> None:
        self.cfg, self.method, self.info, self.out_dir, self.digest = cfg, method, info, out_dir, digest
        self.producer = producer
        self.configs = provenance.stage_configs(cfg, device.resolve(cfg.training.device))
        self.cache = cache.StageCache(cfg.paths.cache_dir, enabled=cfg.cache.enabled)
        self.keys: dict[str, str] = {}
        self.record: dict[str, dict] = {}

    def reused(self, stage: str) -> bool:
        return self.record.get(stage, {}).get("status") in ("reused", "given")

    def _meta(self, stage: str) -> dict:
        order = ["sample", "train", "evaluate"]
        upstream = order[order.index(stage) - 1] if stage != "sample" else None
        return {
            "data_digest": self.digest,
            "data_path": str(self.info.path),
            "method": self.method.name,
            "configs": {s: self.configs[s] for s in order[: order.index(stage) + 1]},
            "upstream": self.keys.get(upstream) if upstream else None,
            "produced_by": self.producer,
        }

    def memo(self, name: str, config: dict, compute) -> dict:
        """Estimator-independent results (rate and histogram limits, their Fisher information) once per data file
        and settings: the ``baseline`` entries of the stage cache (computed directly when the cache is off)."""
        import numpy as np

        if not self.cache.enabled:
            return compute()

        def build(tmp: Path) -> None:
            arrays = {k: np.asarray(v) for k, v in compute().items() if v is not None}
            np.savez(tmp / "arrays.npz", **arrays)

        key = cache.stage_key("baseline", data_digest=self.digest, config={"name": name, **config}, upstream=None)
        meta = {"data_digest": self.digest, "data_path": str(self.info.path), "name": name, "config": config,
                "produced_by": self.producer}
        entry, reused = self.cache.get_or_create("baseline", key, build, meta)
        counts = self.record.setdefault("baseline", {"reused": 0, "computed": 0})
        counts["reused" if reused else "computed"] += 1
        with np.load(entry.path / "arrays.npz") as found:
            return {k: found[k] for k in found.files}

    def plots(self, draw) -> None:
        """The plot stage: ``draw(folder)`` writes ``folder/plots``. Its figures follow from the evaluate stage's
        results and the model's training history only, so with a cached evaluation they are cached too, under
        a key that chains to it (a warm sweep copies them instead of drawing them again)."""
        upstream = self.keys.get("evaluate")
        if not self.cache.enabled or self.record.get("evaluate", {}).get("status") not in ("reused", "computed"):
            draw(self.out_dir)  # no cache, or results the user gave (not content-addressed)
            return
        key = cache.stage_key("plot", data_digest=self.digest, config={"parameters": list(self.info.parameters)},
                              upstream=upstream)
        meta = {"data_digest": self.digest, "data_path": str(self.info.path), "method": self.method.name,
                "upstream": upstream, "produced_by": self.producer}
        entry, reused = self.cache.get_or_create("plot", key, draw, meta)
        with atomic_dir(self.out_dir / "plots") as tmp:
            _copy_files(entry.path / "plots", tmp)
        self.record["plot"] = {"key": key, "status": "reused" if reused else "computed"}

    def is_given(self, stage: str) -> bool:
        return bool(OmegaConf.select(self.cfg, provenance.GIVEN_KEYS[stage]))

    def given(self, stage: str) -> Path:
        """A folder the user named (sampling.samples_dir, ...), after its provenance check."""
        folder = Path(OmegaConf.select(self.cfg, provenance.GIVEN_KEYS[stage]))
        found = provenance.check_given(stage, folder, self.configs, self.digest, self.method)
        self.keys[stage] = found.get("key") or f"given:{folder}"
        self.record[stage] = {"key": self.keys[stage], "status": "given", "source": str(folder),
                              "source_run": provenance.source_run(found.get("produced_by"))}
        return folder

    def produce(self, stage: str, build) -> Path:
        """The stage's folder in the run dir: given, reused from the cache, or computed (and cached)."""
        name = provenance.FOLDERS[stage]
        meta = self._meta(stage)
        key = cache.stage_key(stage, data_digest=self.digest, config=self.configs[stage], upstream=meta["upstream"])
        self.keys[stage] = key
        target = self.out_dir / name
        if not self.cache.enabled:
            build(self.out_dir)
            cache.write_manifest(target, {**meta, "stage": stage, "key": key})
            self.record[stage] = {"key": key, "status": "computed"}
            return target
        entry, reused = self.cache.get_or_create(stage, key, build, meta)
        with atomic_dir(target) as tmp:  # the run dir holds its own verified copy
            _copy_files(entry.path / name, tmp)
            cache.write_manifest(tmp, entry.meta)
        source = entry.meta.get("produced_by") or {}
        self.record[stage] = {"key": key, "status": "reused" if reused else "computed",
                              "source": source.get("output_dir"), "source_run": provenance.source_run(source)}
        if reused:
            log.info("stage %-8s reused from the cache (key %s, made by %s)", stage, key[:12],
                     source.get("output_dir", "?"))
        return target


def _copy_files(source: Path, target: Path) -> None:
    """Copy a folder's files one by one (shutil.copytree folds a full disk into one shutil.Error without errno;
    here the OSError with its errno and file name reaches the one-line report of app.main)."""
    for folder, _, files in os.walk(source):
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                shutil.copy2(Path(folder) / name, out / name)
            except OSError as err:  # name the file that could not be written, not the one read
                raise OSError(err.errno, err.strerror, str(out / name)) from err


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
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
    found = metric_table.spec(metric)
    if found is not None and found.scope == "setting" and "training.alpha" in params:
        raise UserError(
            f"objective.metric={metric} depends on training.alpha, which this search tunes (it would favour small "
            "alpha whatever the estimator); use objective.metric=val_<loss term> (e.g. val_improved_xe) or, on the "
            "toy, a truth_* metric"
        )


def _check_truth_objective(cfg: DictConfig, info, metric: str) -> None:
    """A truth_* objective needs the toy's exact likelihood: refused before any work on a file without it."""
    if not metric.startswith("truth_"):
        return
    if not cfg.evaluation.truth:
        raise UserError(f"objective.metric={metric} is a truth metric, which evaluation.truth=false turns off; "
                        "set evaluation.truth=true or objective.metric=null")
    if ToyTruth.from_file(info.path) is None:
        raise UserError(
            f"objective.metric={metric} compares with the toy's exact likelihood, which {info.path.name} (not a toy "
            "file) does not have; use objective.metric=null (each method's own validation loss term, the best "
            "trial per method)"
        )


def _summary(out_dir: Path, metrics: dict, objective: tuple[str, str], value: float | None) -> None:
    log.info("outputs: %s/{samples,model,results,plots}", out_dir)
    keys = ["train_loss", "val_loss"] + sorted(k for k in metrics if k.startswith("val_") and k != "val_loss")
    keys += ["truth_log_r_mse", "truth_score_mse", "truth_log_likelihood_gap", "limits_cl68_area", "truth_limits_iou"]
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))]
    if shown:
        log.info("metrics: %s", " ".join(shown))
    if value is not None:
        log.info("objective %s = %.6g (%s)", objective[0], value, objective[1])


def resolved(cfg: DictConfig) -> DictConfig:
    """The validated config, resolved once, with enum values as plain strings (still read-only to new keys)."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(plain, True)
    return plain


def _gpu_slots(hydra_cfg) -> Path | None:
    """Where the jobs of a sweep take their GPU slots (app.ml.device.job_gpu); None for a single run."""
    if not str(hydra_cfg.mode).endswith("MULTIRUN"):
        return None
    return Path(hydra_cfg.sweep.dir) / ".gpu_slots"


def _job_num(hydra_cfg) -> int:
    return int(OmegaConf.select(hydra_cfg, "job.num", default=0, throw_on_missing=False) or 0)


def _share_cores(hydra_cfg) -> None:
    """Parallel jobs of one machine (joblib launcher) split its cores: jobs x threads <= cores."""
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    if "joblib" not in target:
        return
    n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=-1) or -1)
    cores = device.usable_cores()
    n_jobs = cores if n_jobs <= 0 else n_jobs
    threads = device.share_cores(n_jobs)
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
