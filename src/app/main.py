"""Entry point: ``python -m app`` / ``madminer-sweep``.

Thin on purpose: compose the config (Hydra), check it, run the requested stages, return the
objective so Hydra sweepers (Optuna) can optimise it. Heavy imports happen inside the stages.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from app.config import register_configs
from app.errors import UserError


def config_dir() -> str:
    """``conf/`` ships inside the wheel as ``app/conf``; in a source checkout it is the top-level ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def task(cfg: DictConfig) -> float | None:
    from app.pipeline import run

    try:
        return run(cfg)
    except KeyboardInterrupt:
        _end_tracking("KILLED", None)
        raise
    except UserError as err:
        if HydraConfig.get().mode == RunMode.RUN:
            _end_tracking("FAILED", err)  # SystemExit skips Hydra's on_job_end
            # One line on stderr, no traceback, exit code 2.
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        # In a multirun this job fails (Hydra records it) and the sweep goes on.
        logging.getLogger("app").error("error: %s", err)
        raise


def _end_tracking(status: str, error: BaseException | None) -> None:
    if "app.callbacks" in sys.modules:
        sys.modules["app.callbacks"].end_active_run(status, error)


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


def main() -> None:
    if any(flag in sys.argv[1:] for flag in ("--help", "-h", "--hydra-help")):
        _list_groups_cheaply()
    task()
