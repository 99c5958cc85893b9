"""Hydra's conformance suites for plugin authors (hydra.test_utils.launcher_common_tests), parametrized as Hydra's
own example sweeper plugin does, run against ``hydra/sweeper=tolerant``; and what the grid adds: a failed job does
not end it, the failure budget, one line for a sweep it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import HydraException
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

from app.sweeps.outcomes import BudgetExceeded


@pytest.fixture(autouse=True)
def hydra_version_base():
    """The suites expect Hydra's compatibility behaviour (jobs change into their output dir). ``@hydra.main`` and
    ``initialize`` set the version base for the whole process, and other tests of this session (the app's own
    ``version_base="1.3"``) may have run first: set the suites' own for each test, then restore it."""
    from hydra import version

    before = version.VersionBase.instance().getbase()
    version.setbase("1.1")
    yield
    version.VersionBase.instance().setbase(before)


@pytest.mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=tolerant"])])
class TestTolerantSweeper(LauncherTestSuite):
    ...


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides", [("joblib", ["hydra/sweeper=tolerant"])])
class TestTolerantSweeperWithJoblib(LauncherTestSuite):
    ...


@pytest.mark.parametrize("launcher_name, overrides",
                         [("basic", ["hydra/sweeper=tolerant", "hydra.sweeper.max_batch_size=2"])])
class TestTolerantSweeperWithBatching(BatchedSweeperTestSuite):
    ...


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/sweeper=tolerant",
                                                                  "hydra/launcher=basic"])])
class TestTolerantSweeperIntegration(IntegrationTestSuite):
    ...


def _grid(runner, tmp_path: Path, task, *overrides: str):
    return runner(calling_file=None, calling_module="hydra.test_utils.a_module", task_function=task,
                  config_path="configs", config_name="compose.yaml", temp_dir=tmp_path / "sweep",
                  overrides=["hydra/sweeper=tolerant", *overrides])


def _fails_on_200(cfg):
    if cfg.bar == 200:
        raise ValueError("bar=200 is refused\nsecond line")
    return cfg.bar / 100


def test_a_failed_job_does_not_end_the_grid(hydra_sweep_runner, tmp_path):
    with _grid(hydra_sweep_runner, tmp_path, _fails_on_200, "bar=100,200,300", "hydra.sweeper.max_batch_size=1") \
            as sweep:
        record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
        assert [len(batch) for batch in sweep.returns] == [1, 1, 1]
    assert [(j["job"], j["status"], j["objective"]) for j in record["jobs"]] == \
        [(0, "finished", 1.0), (1, "failed", None), (2, "finished", 3.0)]
    assert record["jobs"][1]["error"] == "ValueError: bar=200 is refused"
    assert record["jobs"][1]["output_dir"] == str(tmp_path / "sweep" / "1")


def test_the_grid_stops_launching_over_its_budget(hydra_sweep_runner, tmp_path):
    with pytest.raises(BudgetExceeded, match=r"stopped after 2 jobs: 1 failed, more than "
                                             r"hydra.sweeper.max_failure_rate=0.4; failed: job 1 \[bar=200\]: "
                                             r"ValueError: bar=200 is refused$"):
        with _grid(hydra_sweep_runner, tmp_path, _fails_on_200, "bar=100,200,300,400",
                   "hydra.sweeper.max_batch_size=2", "hydra.sweeper.max_failure_rate=0.4"):
            pass
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(record["jobs"]) == 2 and record["stopped"].startswith("stopped after 2 jobs")


@pytest.mark.parametrize("override, message", [
    ("bar=interval(1, 2)", r"runs lists, choice\(\), range\(\) and glob\(\), not bar=interval\(1, 2\)"),
    ("hydra.sweeper.max_failure_rate=1.5", r"hydra.sweeper.max_failure_rate=1.5 is outside its range \[0.0, 1.0\]"),
    ("hydra.sweeper.max_batch_size=0", r"hydra.sweeper.max_batch_size=0 is outside its range >= 1"),
])
def test_what_the_grid_cannot_run_is_one_message(hydra_sweep_runner, tmp_path, override, message):
    with pytest.raises((HydraException, ValueError), match=message):
        with _grid(hydra_sweep_runner, tmp_path, None, "bar=1,2", override):
            pass
