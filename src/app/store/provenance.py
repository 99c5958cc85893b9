"""What each stage's output depends on, and checks that a given output fits this run.

Every stage folder (``samples/``, ``model/``, ``results/``) carries a manifest (:mod:`app.store.cache`): its files'
hashes and its provenance: the data file's digest, the method, and the resolved config subtrees it was produced
with. The stage cache keys entries by the same subtrees; ``stage=train sampling.samples_dir=...`` (and the other
explicit inputs) compare them with this run's config and refuse a mismatch, so a run's params are always the
config that produced its outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from app.domain.methods import Method
from app.errors import UserError
from app.store import cache
from app.store.files import read_json

FOLDERS = {"sample": "samples", "train": "model", "evaluate": "results"}
GIVEN_KEYS = {"sample": "sampling.samples_dir", "train": "training.model_dir", "evaluate": "evaluation.results_dir"}
# Settings that do not change a stage's output: left out of its key and of the provenance checks.
# sampling.n_processes: the theta sets are drawn from their own seeds on any number of processes (the same samples);
# training.compile replays the plain loop's steps from a CUDA graph: the same losses (app.ml.graphs).
NOT_OUTPUT = {"sampling": ("samples_dir", "n_processes"), "training": ("model_dir", "n_workers", "compile"),
              "evaluation": ("results_dir",)}


def _subtree(cfg: DictConfig, group: str) -> dict:
    tree = OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)
    return {k: v for k, v in tree.items() if k not in NOT_OUTPUT[group]}


def stage_configs(cfg: DictConfig, device: str | None = None) -> dict[str, dict]:
    """The config each stage reads (resolved, plain), by stage. Upstream stages are covered by the upstream key.

    ``device``: the device ``training.device`` resolved to on this machine (:func:`app.ml.device.resolve`), keyed in
    its place: ``auto`` is ``cuda`` on a GPU node and ``cpu`` elsewhere, and a model made on one is not the other's.
    """
    sampling = _subtree(cfg, "sampling")
    training = _subtree(cfg, "training")
    if device is not None:
        training["device"] = device
    return {
        # double-parameterized estimators are trained on samples drawn with sample_train_more_ratios
        "sample": {"sampling": sampling, "training": {"estimator": cfg.training.estimator}}
        if cfg.training.estimator == "double_parameterized" else {"sampling": sampling},
        "train": {"training": training, "seed": cfg.seed},
        # evaluation reads the test partition: the sampling splits, specs and seed matter too; the model runs on the
        # resolved device (the batched evaluation)
        "evaluate": {"evaluation": _subtree(cfg, "evaluation"), "sampling": sampling}
        | ({} if device is None else {"device": device}),
    }


def check_given(stage: str, folder: Path, expected: dict[str, dict], data_digest: str, method: Method) -> dict:
    """The provenance of a folder given with sampling.samples_dir / training.model_dir / evaluation.results_dir.

    Refuses (one line) a damaged folder, one without a manifest, one made from another data file, for another
    method, or with any setting that differs from this run's (naming the first difference).
    """
    key = GIVEN_KEYS[stage]
    problem = cache.verify(folder)
    if problem is not None:
        raise UserError(
            f"{key}={folder} cannot be trusted: {problem}; re-run the {stage} stage (or drop {key} and let the "
            "stage cache provide it)"
        )
    provenance = cache.read_provenance(folder) or {}
    if provenance.get("data_digest") != data_digest:
        raise UserError(
            f"{key}={folder} was made from another data file (sha256 {str(provenance.get('data_digest'))[:12]}, "
            f"this run's is {data_digest[:12]}); point {key} at outputs of this data file"
        )
    if provenance.get("method") not in (None, method.name) and stage != "sample":
        raise UserError(
            f"{key}={folder} holds a {provenance['method']} {stage} output but training={method.name} was chosen; "
            f"use training={provenance['method']} or another {key}"
        )
    made_with = provenance.get("configs", {})
    for upstream in ("sample", "train", "evaluate"):
        if upstream not in made_with:
            continue
        difference = _first_difference(_outputs_only(made_with[upstream]), expected[upstream])
        if difference:
            name, theirs, ours = difference
            raise UserError(
                f"{key}={folder} was made with {name}={_show(theirs)} but this run has {name}={_show(ours)}; "
                f"run with the same settings, or drop {key} (the stage cache reuses matching outputs)"
            )
        if upstream == stage:
            break
    return provenance


def _outputs_only(configs: dict) -> dict:
    """A stage's recorded configs without the settings that change no output (recorded by older versions, e.g.
    sampling.n_processes before its samples stopped depending on it)."""
    return {group: {k: v for k, v in tree.items() if k not in NOT_OUTPUT[group]}
            if group in NOT_OUTPUT and isinstance(tree, dict) else tree for group, tree in configs.items()}


def _first_difference(theirs: Any, ours: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted name, their value, our value) of the first setting that differs, or None."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for k in sorted(set(theirs) | set(ours)):
            found = _first_difference(theirs.get(k), ours.get(k), f"{prefix}.{k}" if prefix else k)
            if found:
                return found
        return None
    return None if theirs == ours else (prefix, theirs, ours)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).replace(" ", "")


def source_run(produced_by: dict | None) -> str | None:
    """The MLflow run that produced a stage output: recorded with it, or, when that job's run did not exist yet (the
    helper of :mod:`app.tracking.helper` creates runs in the background), read from the producing job's
    ``run.json``."""
    produced_by = produced_by or {}
    if produced_by.get("mlflow_run_id"):
        return produced_by["mlflow_run_id"]
    folder = produced_by.get("output_dir")
    if not folder:
        return None
    try:
        return read_json(Path(folder) / "run.json").get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
