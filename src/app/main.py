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
from app.errors import Pruned, UserError, first_line
from app.sweeps import slurm
from app.sweeps.pruning import reporter
from app.sweeps.storage import prepare_storage
from app.tracking.redaction import redact_log_records, redact_text


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
    except (UserError, Pruned):  # Pruned: the search's pruner stopped the trial; the sweeper tells the study
        raise
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN and not _full_error():
            # The sweep ends with one line per failed job (app.sweeps); the traceback goes to the job's folder.
            out = Path(HydraConfig.get().runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text("".join(traceback.format_exception(err)))
            logging.getLogger("app").error("error: %s: %s (traceback: %s)", type(err).__name__, err, out / "error.txt")
        raise


def _task(cfg: DictConfig) -> float | None:
    from app.pipeline import run

    try:
        return run(cfg, on_record=reporter(cfg))
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
    reason = getattr(err, "strerror", None) or first_line(err)[:120]
    if isinstance(err, RuntimeError) or err.errno in NO_SPACE or _short_write(err):
        return (f"no space left while writing {name} ({reason}); nothing half-written was kept: free disk "
                f"space or set {key}=<a folder on another disk>")
    return f"cannot write {name} ({reason}); set {key}=<a writable folder> or fix the path's permissions"


class Preflight(Callback):
    """What Hydra itself would only report with a traceback, checked before any job starts.

    The run (or sweep) dir must be creatable and writable, an Optuna storage URL (``hydra.sweeper.storage``) must
    open, and a SLURM launcher's request must fit a node of its partition (``app.sweeps.slurm``: else its jobs stay
    PENDING for ever). Registered before the MLflow callback under ``hydra.callbacks``.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _writable_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage:
            _open_optuna_storage(storage)
        launcher = OmegaConf.select(config, "hydra.launcher", default=None)
        if slurm.is_slurm(launcher):
            try:
                slurm.check(launcher)
            except UserError as err:
                _fail_early(str(err))


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


    try:
        prepare_storage(url)  # sqlite: the database's folder (multirun/ for the presets) may not exist yet
        get_storage(url)
    except Exception as err:  # noqa: BLE001 - whatever the database driver raises, the fix is the same
        if _full_error():
            raise
        _fail_early(f"Optuna storage {redact_text(url)} cannot be opened ({redact_text(first_line(err))[:200]}); fix "
                    "hydra.sweeper.storage (e.g. sqlite:///optuna.db in a writable folder, or a reachable "
                    "database) or set hydra.sweeper.storage=null for an in-memory study")


def _fail_early(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _end_tracking(status: str, error: BaseException | None) -> None:
    if "app.tracking.callback" in sys.modules:
        sys.modules["app.tracking.callback"].end_active_run(status, error)


def _interrupted_in_one_line(previous):
    """An uncaught Ctrl-C prints one line, not the traceback of wherever the command was waiting (HYDRA_FULL_ERROR=1
    keeps the traceback); the process still ends by SIGINT, as Python ends on an uncaught KeyboardInterrupt. The
    tracking callback's hook (a sweep's parent run ends KILLED) wraps this one."""

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt) and not _full_error():
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    return hook


def main() -> None:
    """``madminer-sweep`` / ``python -m app``: Hydra reads the command line, composes the config, runs :func:`task`."""
    sys.excepthook = _interrupted_in_one_line(sys.excepthook)
    task()
