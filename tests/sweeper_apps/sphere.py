"""A bare Hydra app (not this project's) that uses the project's Optuna sweeper: Hydra's Optuna example, the sphere.

``error=true`` fails every job, ``sleep=S`` makes each job last S seconds, ``objective=none|not_finite|pair``
returns that."""

import time

import hydra
from omegaconf import DictConfig


def sphere(cfg: DictConfig):
    if cfg.sleep:
        time.sleep(cfg.sleep)
    if cfg.error:
        raise RuntimeError("cfg.error is True")
    if cfg.objective == "none":
        return None
    if cfg.objective == "not_finite":
        return float("nan")
    if cfg.objective == "pair":  # two objectives (Binh and Korn, Hydra's multi-objective example)
        return 4 * cfg.x**2 + 4 * cfg.y**2, (cfg.x - 5) ** 2 + (cfg.y - 5) ** 2
    return cfg.x**2 + cfg.y**2 + cfg.get("w", 0) ** 2


def configure(cfg: DictConfig, trial) -> None:
    """hydra.sweeper.custom_search_space: z near x, and a new key w."""
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_z_difference_from_x, x + cfg.max_z_difference_from_x)
    trial.suggest_float("+w", 0.0, 1.0)


if __name__ == "__main__":  # decorated here only: hydra.main sets Hydra's version base for the whole process
    hydra.main(version_base="1.3", config_path="conf", config_name="sphere")(sphere)()
