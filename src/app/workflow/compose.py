"""The config every step will see, composed without a Hydra run: for the checks of ``setup`` and the runner's
tracking defaults."""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app.config import register_configs
from app.errors import UserError, first_line
from app.main import config_dir
from app.store.files import sqlite_path
from app.workflow.params import NONE


def compose(overrides: list[str]) -> DictConfig:
    """The composed config (no Hydra run), as ``python -m app OVERRIDES`` would see it."""
    register_configs()
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"overrides {' '.join(overrides)}: {first_line(err)}") from None


def resolved_without_run(cfg: DictConfig) -> DictConfig:
    """The job's config resolved, as the stages see it, less what needs a Hydra run (the run dir): ``paths`` keeps
    only ``cache_dir``."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("paths", "hydra")])
    plain = OmegaConf.to_container(job, resolve=True, enum_to_str=True)
    plain["paths"] = {"cache_dir": cfg.paths.cache_dir}
    return OmegaConf.create(plain)


def default_tracking(overrides: list[str]) -> tuple[str, str]:
    """(tracking URI or ``none``, experiment) of the composed config; a relative sqlite path made absolute."""
    cfg = compose(overrides)
    t = cfg.tracking
    if t.mode == "disabled":
        return NONE, t.experiment_name or "madminer-sweeper"
    uri = t.uri
    if not uri:
        raise UserError(f"tracking={t.mode} needs a tracking URI; set MLFLOW_TRACKING_URI or --tracking-uri")
    database = sqlite_path(uri)
    if database is not None and not database.is_absolute():  # every step runs in its own dir
        query = uri.partition("?")[1] + uri.partition("?")[2]
        uri = f"sqlite:///{database.resolve()}{query}"
    elif "://" not in uri and not uri.startswith("file:"):
        uri = str(Path(uri).resolve())
    return uri, t.experiment_name
