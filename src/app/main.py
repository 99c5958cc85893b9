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
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The sweep ends with one line per failed job; the traceback goes to the job's folder.
            import traceback

            out = Path(HydraConfig.get().runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text("".join(traceback.format_exception(err)))
            logging.getLogger("app").error("error: %s: %s (traceback: %s)", type(err).__name__, err, out / "error.txt")
        raise


def _end_tracking(status: str, error: BaseException | None) -> None:
    if "app.callbacks" in sys.modules:
        sys.modules["app.callbacks"].end_active_run(status, error)


def main() -> None:
    task()
