"""MLflow Model Registry: each training as a new version of ``madminer-<method>``; the best of a sweep gets ``@best``.

The registered model is a pyfunc that loads the MadMiner files saved by the train stage and, for a
DataFrame with one column per observable and per parameter, returns
log r(x | theta, theta_ref) (ratio methods; theta_ref as in training), the score t(x) at the
training point (score methods, one column per parameter) or log p(x | theta) (density methods).
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow.pyfunc

from app.ml import estimators
from app.ml.batched import parameter_inputs

BEST_ALIAS = "best"


def model_name(method: str) -> str:
    return f"madminer-{method}"


class MadMinerEstimator(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        model_dir = Path(context.artifacts["model_dir"])
        self.meta = json.loads((model_dir / "model.json").read_text())

        self.estimator = estimators.load(model_dir)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        frame = pd.DataFrame(model_input)
        x = frame[self.meta["observables"]].to_numpy(dtype=float)
        theta = frame[self.meta["parameters"]].to_numpy(dtype=float)
        family, kind = self.meta["family"], self.meta["estimator"]
        if family == "score":
            t = estimators.score(self.estimator, x)
            return pd.DataFrame(t, columns=[f"t_{p}" for p in self.meta["parameters"]])
        # density and double-parameterized networks take theta standardised as in training, which MadMiner's
        # evaluate_* omit (docs/madminer-bugs.md): each member gets it, and the mean is the ensemble's
        members = estimators.members(self.estimator)
        if family == "density":
            out = np.mean([
                m.evaluate_log_likelihood(x=x, theta=parameter_inputs(m, theta), test_all_combinations=False)[0]
                for m in members
            ], axis=0)  # fmt: skip
            return pd.DataFrame({"log_p": np.asarray(out).ravel()})
        if kind == "double_parameterized":
            reference = np.zeros_like(theta)
            out = np.mean([
                m.evaluate_log_likelihood_ratio(x=x, theta0=parameter_inputs(m, theta),
                                                theta1=parameter_inputs(m, reference), test_all_combinations=False)[0]
                for m in members
            ], axis=0)  # fmt: skip
        else:
            out = self.estimator.evaluate_log_likelihood_ratio(x=x, theta=theta, test_all_combinations=False)[0]
        return pd.DataFrame({"log_r": np.asarray(out).ravel()})


def log_and_register(model_dir: Path) -> tuple[str, str]:
    """Log the active run's model as a pyfunc and register it; returns (name, version)."""
    import numpy as np
    import pandas as pd

    meta = json.loads((model_dir / "model.json").read_text())
    example = pd.DataFrame(
        np.zeros((2, len(meta["observables"]) + len(meta["parameters"]))),
        columns=[*meta["observables"], *meta["parameters"]],
    )
    name = model_name(meta["method"])
    with warnings.catch_warnings(), _quiet("mlflow.pyfunc", "mlflow.models"):
        warnings.simplefilter("ignore", UserWarning)  # "add type hints to predict": DataFrames in, DataFrames out
        info = _log_model(model_dir, example, name)
    return name, str(info.registered_model_version)


def _log_model(model_dir: Path, example, name: str):
    from importlib.metadata import version

    return mlflow.pyfunc.log_model(
        name="estimator",
        python_model=MadMinerEstimator(),
        artifacts={"model_dir": str(model_dir)},
        input_example=example,
        registered_model_name=name,
        # explicit requirements: MLflow's inference would import and run the model in a subprocess
        pip_requirements=[f"madminer-sweeper=={version('madminer-sweeper')}", f"madminer=={version('madminer')}"],
    )


@contextmanager
def _quiet(*names: str):
    """MLflow warns about cloudpickled python_model objects; this one is a class of an installed package."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def alias_best(client, run_id: str, alias: str = BEST_ALIAS) -> str | None:
    """Point ``alias`` at the registered version that ``run_id`` produced; returns the model name."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(version.name, alias, version.version)
    return version.name
