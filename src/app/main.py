"""Entry point: ``python -m app`` / ``madminer-sweep``.

Thin on purpose: compose the config (Hydra), check it, run the requested stages, return the
objective so Hydra sweepers (Optuna) can optimise it. Heavy imports happen inside the stages.
Bad input, a full disk or a folder that cannot be written ends in one ``error: ...`` line (exit
code 2), here or in :class:`Preflight` for what fails before the job; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.config import register_configs
from app.errors import UserError
from app.tracking.redaction import redact_log_records


def config_dir() -> str:
    """``conf/`` ships inside the wheel as ``app/conf``; in a source checkout it is the top-level ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


register_configs()
redact_log_records()  # secrets (token=..., user:password@ in URIs) never reach a log line


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def task(cfg: DictConfig) -> float | None:
    try:
        return _task(cfg)
    except UserError:
        raise
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN and not _full_error():
            # The sweep ends with one line per failed job (app.sweep); the traceback goes to the job's folder.
            out = Path(HydraConfig.get().runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text("".join(traceback.format_exception(err)))
            logging.getLogger("app").error("error: %s: %s (traceback: %s)", type(err).__name__, err, out / "error.txt")
        raise


def _task(cfg: DictConfig) -> float | None:
    from app.pipeline import run

    try:
        return run(cfg)
    except KeyboardInterrupt:
        _end_tracking("KILLED", None)
        raise
    except UserError as err:
        _report(err)
    except (OSError, RuntimeError) as err:
        if _full_error() or not _is_write_failure(err):
            raise
        _report(UserError(file_error_message(err, cfg)))
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused code in a model file
        if _full_error():
            raise
        found = re.search(r"GLOBAL (\S+)", str(err))
        _report(UserError(
            f"refused to load a model file of {cfg.training.model_dir or 'this run'}: it holds code, not only "
            f"tensors ({found.group(1) if found else 'not a plain state dict'}); load only models this app wrote "
            "(training.model_dir=<an earlier run>/model)"
        ))


# Failures of the disk or of permissions: the user's to fix, so one line rather than a traceback.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FILE_ERRNOS = NO_SPACE | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in FILE_ERRNOS or _short_write(err)
    # torch.save reports a failed write as RuntimeError ("file write failed", "unexpected pos ...")
    return any(f.filename.endswith(f"torch{os.sep}serialization.py") for f in _frames(err))


def _frames(err: BaseException) -> traceback.StackSummary:
    return traceback.extract_tb(err.__traceback__)


def _stage(err: BaseException) -> str | None:
    """The stage (app/stages/NAME.py) that was running when ``err`` was raised."""
    stages = [Path(f.filename).stem for f in _frames(err) if Path(f.filename).parent.name == "stages"]
    return stages[-1] if stages else None


def _short_write(err: OSError) -> bool:
    """NumPy reports a full disk during ``np.save`` as 'N requested and M written', without an errno."""
    return err.errno is None and re.search(r"\d+ requested and \d+ written", str(err)) is not None


def _report(err: UserError):
    if HydraConfig.get().mode == RunMode.RUN:
        _end_tracking("FAILED", err)  # SystemExit skips Hydra's on_job_end
        # One line on stderr, no traceback, exit code 2.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # In a multirun this job fails (Hydra records it) and the sweep goes on.
    logging.getLogger("app").error("error: %s", err)
    raise err


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def file_error_message(err: OSError | RuntimeError, cfg: DictConfig | None = None) -> str:
    """'cannot write X (reason); fix' for a disk-full or permission error, naming the option that moves X."""
    filename = getattr(err, "filename", None)
    stage = _stage(err)
    name = filename or (f"the {stage} stage's files" if stage else "the run's files")
    key = "hydra.run.dir"
    cache = OmegaConf.select(cfg, "paths.cache_dir", default=None) if cfg is not None else None
    if cache and filename and Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(cache)):
        key = "paths.cache_dir"
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0][:120]
    if isinstance(err, RuntimeError) or err.errno in NO_SPACE or _short_write(err):
        return (f"no space left while writing {name} ({reason}); nothing half-written was kept: free disk "
                f"space or set {key}=<a folder on another disk>")
    return f"cannot write {name} ({reason}); set {key}=<a writable folder> or fix the path's permissions"


class Preflight(Callback):
    """What Hydra itself would only report with a traceback, checked before any job starts.

    The run (or sweep) dir must be creatable and writable, and an Optuna storage URL
    (``hydra.sweeper.storage``) must open. Registered first under ``hydra.callbacks``.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage:
            _open_optuna_storage(storage)


def _writable_dir(folder: str, key: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        if _full_error():
            raise
        _fail_early(f"cannot create or write the output dir {folder} ({err.strerror or err}); "
                    f"set {key}=<a writable folder>")


def _open_optuna_storage(url: str) -> None:
    from optuna.storages import get_storage

    from app.sweep import prepare_storage
    from app.tracking.backend import redact_text

    try:
        prepare_storage(url)  # sqlite: the database's folder (multirun/ for the presets) may not exist yet
        get_storage(url)
    except Exception as err:  # noqa: BLE001 - whatever the database driver raises, the fix is the same
        if _full_error():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail_early(f"Optuna storage {redact_text(url)} cannot be opened ({redact_text(first)[:200]}); fix "
                    "hydra.sweeper.storage (e.g. sqlite:///optuna.db in a writable folder, or a reachable "
                    "database) or set hydra.sweeper.storage=null for an in-memory study")


def _fail_early(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _end_tracking(status: str, error: BaseException | None) -> None:
    if "app.tracking.callback" in sys.modules:
        sys.modules["app.tracking.callback"].end_active_run(status, error)


def _list_groups_cheaply() -> None:
    """``--help``: let Hydra's group listing share one copy of the config repository.

    Hydra 1.3 lists config groups (for ``$APP_CONFIG_GROUPS`` and ``$HYDRA_CONFIG_GROUPS``, both computed
    for every help text) through ``get_group_options``, which deep-copies the whole repository, registered
    schemas and Hydra's own structured configs included, once per call: about 100 copies, most of the
    ``--help`` time. With the same config name and overrides every copy is the same, so one is reused.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = getattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo", None)
    if original is None:  # another Hydra version: keep its own listing
        return
    repos: dict = {}

    def shared(self, config_name, overrides):
        key = (id(self), config_name, tuple(overrides))
        if key not in repos:
            repos[key] = original(self, config_name, overrides)
        return repos[key]

    ConfigLoaderImpl._parse_overrides_and_create_caching_repo = shared

    # The `schema` group holds the typed bases the presets extend (app.config), not choices: keep it out of --help.
    from hydra._internal.hydra import Hydra

    listed = Hydra.list_all_config_groups

    def user_groups(self, parent: str = ""):
        return [g for g in listed(self, parent) if g.split("/", 1)[0] != "schema"]

    Hydra.list_all_config_groups = user_groups


def _compose_jobs_cheaply() -> None:
    """Sweeps: compose the part of a job's config that only the config groups decide once per set of choices.

    Hydra composes every job of a sweep from scratch (and twice in a joblib sweep: the parent validates the batch,
    the worker composes again): the defaults list from the group choices, then the merge of every config file it
    names, deep copies of the repository's configs included (~0.25 s a job on 2 cores, ~30 % of an 8-trial sweep's
    overhead; docs/performance.md). Both depend on the group choices only (``training=sally``, ``hydra/launcher=...``);
    a job's values (``training.alpha=2``, ``hydra.job.num``) are applied afterwards, as Hydra does. So both are kept
    per (config name, group choices) and a job gets a deep copy of the composed config plus its own value overrides.
    ``MADMINER_SWEEPER_HYDRA_COMPOSE=plain`` keeps Hydra's own path (for comparison)."""
    import copy
    import dataclasses

    from hydra._internal import config_loader_impl as impl
    from hydra._internal.defaults_list import DefaultsList, Overrides

    if os.environ.get("MADMINER_SWEEPER_HYDRA_COMPOSE") == "plain" or getattr(impl, "_madminer_sweeper", False):
        return
    create = impl.create_defaults_list
    compose = getattr(impl.ConfigLoaderImpl, "_compose_config_from_defaults_list", None)
    if compose is None or not dataclasses.is_dataclass(DefaultsList):  # another Hydra version: its own path
        return
    lists: dict = {}
    configs: dict = {}

    def create_defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing):
        values = Overrides(repo, overrides_list).config_overrides  # as Hydra splits them (and checks them)
        groups = tuple(o.input_line for o in overrides_list if o not in values and not o.is_sweep_override())
        key = (config_name, bool(prepend_hydra), bool(skip_missing), groups)
        if key not in lists:
            lists[key] = create(repo=repo, config_name=config_name, overrides_list=overrides_list,
                                prepend_hydra=prepend_hydra, skip_missing=skip_missing)
        return dataclasses.replace(lists[key], config_overrides=values)

    def compose_config_from_defaults_list(self, defaults, repo):
        key = tuple(repr(d) for d in defaults)
        if key not in configs:
            configs[key] = compose(self, defaults, repo)
        return copy.deepcopy(configs[key])  # Hydra sets flags and applies the job's overrides on it

    impl.create_defaults_list = create_defaults_list
    impl.ConfigLoaderImpl._compose_config_from_defaults_list = compose_config_from_defaults_list
    impl._madminer_sweeper = True


def main() -> None:
    if any(flag in sys.argv[1:] for flag in ("--help", "-h", "--hydra-help")):
        _list_groups_cheaply()
    try:
        task()
    except SystemExit as done:  # how Hydra (and our one-line errors) end every command
        exit_now(done.code)
    exit_now(0)


def exit_now(code: int | str | None) -> None:
    """End the process as a normal exit does, without tearing down every module one by one.

    With torch, MadMiner and MLflow loaded, the interpreter's module teardown takes about 1 s of CPU after the
    work is done, 1-2.5 s of wall time (bench/startup.py, ``exit``), once per process: every run, sweep, Optuna
    search and Yadage step. What a normal exit guarantees still happens, in the same order: the other non-daemon
    threads are joined, the ``atexit`` handlers run (the MLflow parent's closing, MLflow's flush, loky's and
    logging's shutdown, which flushes and closes Hydra's log files), and stdout/stderr are flushed. Only then
    ``os._exit``. Under a profiler or tracer (cProfile, coverage), or with ``MADMINER_SWEEPER_FULL_EXIT=1``, the
    ordinary exit instead.
    """
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed, exit code 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    profiled = sys.getprofile() is not None or sys.gettrace() is not None  # cProfile writes its file after main
    full = os.environ.get("MADMINER_SWEEPER_FULL_EXIT", "") not in ("", "0")  # the ordinary exit, on request
    if profiled or full or shutdown is None or not hasattr(atexit, "_run_exitfuncs"):  # or another Python
        raise SystemExit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_compose_jobs_cheaply()  # here, so that joblib workers (which import this module for the task) compose cheaply too
