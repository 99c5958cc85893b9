"""``hydra/sweeper=tolerant_optuna`` against what Hydra's own Optuna plugin tests (plugins/hydra_optuna_sweeper/tests:
discovery, search-space parsing, n_trials, the sphere example, grid sampler, several objectives, a custom search
space, the failure rate's exit code), and what this project adds: the budget over all trials, a resumed study,
FAIL for a missing objective, Ctrl-C. A bare Hydra app (tests/sweeper_apps/sphere.py), in-process where a process
adds nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf
from optuna.distributions import (
    CategoricalDistribution,
    DiscreteUniformDistribution,
    IntLogUniformDistribution,
    IntUniformDistribution,
    LogUniformDistribution,
    UniformDistribution,
)
from optuna.trial import TrialState

from app.sweeps.outcomes import BudgetExceeded
from hydra_plugins.madminer_sweeper import _space

APPS = Path(__file__).parent / "sweeper_apps"
sys.path.insert(0, str(APPS))
import sphere  # noqa: E402  (tests/sweeper_apps)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_discovery_finds_both_sweepers_and_imports_neither_optuna_nor_the_app():
    names = [x.__name__ for x in Plugins.instance().discover(Sweeper)]
    assert "TolerantSweeper" in names and "TolerantOptunaSweeper" in names
    code = ("import sys\nfrom hydra.core.plugins import Plugins\nfrom hydra.plugins.sweeper import Sweeper\n"
            "Plugins.instance().discover(Sweeper)\nprint(sorted(m for m in ('optuna', 'app', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("text, expected", [
    ("key=choice(1,2)", CategoricalDistribution([1, 2])),
    ("key=choice(true, false)", CategoricalDistribution([True, False])),
    ("key=choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
    ("key=choice([32,32],[64,64])", CategoricalDistribution(["[32,32]", "[64,64]"])),
    ("key=shuffle(range(1,3))", CategoricalDistribution([1, 2])),
    ("key=range(1,3)", IntUniformDistribution(1, 3)),
    ("key=range(1,10,step=3)", IntUniformDistribution(1, 10, step=3)),
    ("key=interval(1, 5)", UniformDistribution(1, 5)),
    ("key=int(interval(1, 5))", IntUniformDistribution(1, 5)),
    ("key=tag(log, interval(1, 5))", LogUniformDistribution(1, 5)),
    ("key=tag(log, int(interval(1, 5)))", IntLogUniformDistribution(1, 5)),
    ("key=range(0.5, 5.5, step=1)", DiscreteUniformDistribution(0.5, 5.5, 1)),
])
def test_search_space_from_the_override_grammar(text, expected):
    actual = _space.distribution(OverridesParser.create().parse_overrides([text])[0])
    if isinstance(expected, CategoricalDistribution):  # shuffle() orders the choices at random
        assert isinstance(actual, CategoricalDistribution) and set(actual.choices) == set(expected.choices)
    else:
        assert actual == expected


@pytest.mark.parametrize("overrides, space, fixed", [
    (["key=choice(1,2)"], {"key": CategoricalDistribution([1, 2])}, {}),
    (["key=5"], {}, {"key": "key=5"}),
    (["k1=choice(1,2)", "k2=5", "k3=range(1,3)"], {"k1": CategoricalDistribution([1, 2]),
                                                   "k3": IntUniformDistribution(1, 3)}, {"k2": "k2=5"}),
    (["~z"], {}, {"~z": "~z"}),
    (["+w=3", "~z=10"], {}, {"+w": "+w=3", "~z": "~z=10"}),
    (["x=interval(0, 1)", "x=0.5"], {}, {"x": "x=0.5"}),  # the command line fixes a parameter of the preset
    (["x=0.5", "x=interval(0, 1)"], {"x": UniformDistribution(0, 1)}, {}),
])
def test_searched_and_fixed_overrides(overrides, space, fixed):
    assert _space.split(OverridesParser.create().parse_overrides(overrides)) == (space, fixed)


def test_glob_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"key=glob\(\*\): .* list the values with choice"):
        _space.distribution(OverridesParser.create().parse_overrides(["key=glob(*)"])[0])


def _sweep(runner, tmp_path: Path, *overrides: str, config_name: str = "sphere", task=sphere.sphere):
    return runner(calling_file=str(APPS / "sphere.py"), calling_module=None, task_function=task,
                  config_path="conf", config_name=config_name, overrides=list(overrides), temp_dir=tmp_path / "sweep")


def _record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "sweep" / "sweep.json").read_text())


def test_launch_jobs_in_batches_of_n_jobs(hydra_sweep_runner, tmp_path):
    with hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module", task_function=None,
                            config_path="configs", config_name="compose.yaml", temp_dir=tmp_path / "sweep",
                            overrides=["hydra/sweeper=tolerant_optuna", "hydra/launcher=basic", "+x=interval(0, 1)",
                                       "hydra.sweeper.n_trials=5", "hydra.sweeper.n_jobs=2"]) as sweep:
        record = _record(tmp_path)
        assert [len(batch) for batch in sweep.returns] == [2, 2, 1]  # the JobReturns of each batch
    assert [j["job"] for j in record["jobs"]] == list(range(5))
    assert {j["status"] for j in record["jobs"]} == {"finished"} and {j["objective"] for j in record["jobs"]} == {100}


@pytest.mark.slow
@pytest.mark.parametrize("with_commandline", [True, False])
def test_sphere_example(hydra_sweep_runner, tmp_path, with_commandline):
    """Hydra's test_optuna_example: 20 TPE trials (seed 123) reach the 95th percentile bound of 1000 seeds."""
    storage = f"sqlite:///{tmp_path}/test.db"
    extra = ["x=choice(0, 1, 2)", "y=0"] if with_commandline else []
    with _sweep(hydra_sweep_runner, tmp_path, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=example",
                "hydra.sweeper.sampler.seed=123", "~z", *extra):
        results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
        record = _record(tmp_path)
    best = optuna.load_study(storage=storage, study_name="example").best_trial
    assert results.name == "optuna" and results.best_value == best.value and results.best_params == best.params
    assert results.best_value <= 2.27
    assert len(record["jobs"]) == 20
    if with_commandline:
        assert "y" not in best.params and results.best_value in (0, 1, 4)
        assert all("y=0" in j["overrides"] for j in record["jobs"])
    else:
        assert set(best.params) == {"x", "y"}


def _params(runner, tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    storage = f"sqlite:///{tmp_path}/seeds.db"
    with _sweep(runner, tmp_path / name, "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
                f"hydra.sweeper.study_name={name}", "hydra/sweeper/sampler=random", *overrides):
        pass
    return [t.params for t in optuna.load_study(storage=storage, study_name=name).trials]


def test_the_sampler_seed_decides_the_trials(hydra_sweep_runner, tmp_path):
    first = _params(hydra_sweep_runner, tmp_path, "a", "hydra.sweeper.sampler.seed=7")
    assert len(first) == 3
    assert _params(hydra_sweep_runner, tmp_path, "b", "hydra.sweeper.sampler.seed=7") == first
    assert _params(hydra_sweep_runner, tmp_path, "c", "hydra.sweeper.sampler.seed=8") != first


def test_a_stored_study_resumes_with_n_trials_more(hydra_sweep_runner, tmp_path):
    storage = f"sqlite:///{tmp_path}/deep/folder/resume.db"  # the folder is created first
    args = ["hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resumed"]
    for _ in range(2):
        with _sweep(hydra_sweep_runner, tmp_path, *args):
            assert [j["job"] for j in _record(tmp_path)["jobs"]] == [0, 1, 2]  # each invocation numbers its jobs
    trials = optuna.load_study(storage=storage, study_name="resumed").trials
    assert [t.number for t in trials] == list(range(6)) and {t.state for t in trials} == {TrialState.COMPLETE}


@pytest.mark.parametrize("n_trials", [pytest.param(20, marks=pytest.mark.slow), 1])
def test_grid_sampler_runs_each_point_once(hydra_sweep_runner, tmp_path, n_trials):
    """Hydra's test_example_with_grid_sampler: x in {-1, 1}, y in range(-1.0, 1.0, step=1) (stop included, as the
    distribution's), z in {foo, bar}: n_trials is capped at the 12 points of the grid."""
    with _sweep(hydra_sweep_runner, tmp_path, "hydra/sweeper/sampler=grid", f"hydra.sweeper.n_trials={n_trials}",
                "x=choice(-1, 1)", "y=range(-1.0, 1.0, step=1)", "z=choice(foo, bar)"):
        record, results = _record(tmp_path), OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    points = [tuple(sorted(j["overrides"])) for j in record["jobs"]]
    assert len(points) == min(n_trials, 12) and len(set(points)) == len(points)
    if n_trials >= 12:
        assert results.best_value == 1 and abs(results.best_params.x) == 1 and results.best_params.y == 0
    assert results.best_params.z in ("foo", "bar")


@pytest.mark.slow
def test_two_objectives(hydra_sweep_runner, tmp_path):
    """Hydra's test_optuna_multi_objective_example: the Pareto front, none of its trials dominating another."""
    with _sweep(hydra_sweep_runner, tmp_path, "objective=pair", "hydra.sweeper.direction=[minimize,minimize]",
                "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", "x=range(0, 5)", "y=range(0, 3)"):
        solutions = OmegaConf.to_container(
            OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").solutions)
    assert solutions
    for a in solutions:
        assert a["params"]["x"] % 1 == 0 and a["params"]["y"] % 1 == 0
        for b in solutions:
            dominates = all(u <= v for u, v in zip(a["values"], b["values"])) and \
                any(u < v for u, v in zip(a["values"], b["values"]))
            assert not dominates


@pytest.mark.slow
def test_custom_search_space(hydra_sweep_runner, tmp_path):
    with _sweep(hydra_sweep_runner, tmp_path, "hydra.sweeper.custom_search_space=sphere.configure",
                "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123", "max_z_difference_from_x=0.3"):
        best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml").best_params
        jobs = _record(tmp_path)["jobs"]
    assert abs(best["x"] - best["z"]) <= 0.3 and 0 <= best["+w"] <= 1
    assert all(any(o.startswith("+w=") for o in j["overrides"]) for j in jobs)


@pytest.mark.parametrize("objective", ["none", "not_finite"])
def test_a_job_without_a_finite_objective_is_a_failed_trial(hydra_sweep_runner, tmp_path, objective):
    storage = f"sqlite:///{tmp_path}/fail.db"
    with _sweep(hydra_sweep_runner, tmp_path, f"objective={objective}", "hydra.sweeper.n_trials=3",
                "hydra.sweeper.max_failure_rate=1.0", f"hydra.sweeper.storage={storage}"):
        record = _record(tmp_path)
    assert [t.state for t in optuna.load_study(storage=storage, study_name="sphere").trials] == [TrialState.FAIL] * 3
    assert {j["status"] for j in record["jobs"]} == {"failed"}
    assert record["jobs"][0]["error"].startswith("ValueError: the job returned ")
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()


def test_the_budget_counts_all_trials_so_far(hydra_sweep_runner, tmp_path):
    """n_jobs=1, max_failure_rate=0.5: Hydra's sweeper stops at the first failure (one failure in a batch of one is
    a rate of 1); this one at the first trial after which more than half of all trials failed."""
    def task(cfg):
        if task.calls in (1, 3, 4):
            task.calls += 1
            raise RuntimeError(f"trial {task.calls - 1} fails")
        task.calls += 1
        return 1.0

    task.calls = 0
    with pytest.raises(BudgetExceeded, match=r"stopped after 5 jobs: 3 failed, more than "
                                             r"hydra.sweeper.max_failure_rate=0.5; failed: job 1 .*"
                                             r"RuntimeError: trial 1 fails"):
        with _sweep(hydra_sweep_runner, tmp_path, "hydra.sweeper.n_trials=10", "hydra.sweeper.max_failure_rate=0.5",
                    task=task):
            pass
    record = _record(tmp_path)
    assert [j["status"] for j in record["jobs"]] == ["finished", "failed", "finished", "failed", "failed"]
    assert record["stopped"].startswith("stopped after 5 jobs")


def _run_sphere(tmp_path: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APPS / "sphere.py"), "-m", f"hydra.sweep.dir={tmp_path}/sweep",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_failure_rate_exit_code(tmp_path, max_failure_rate):
    """Hydra's test_failure_rate, with the exit code: over budget, a bare app's command fails with the job's
    error; at 1.0 every trial runs and the command succeeds."""
    proc = _run_sphere(tmp_path, "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=2",
                       "hydra/sweeper/sampler=random", f"hydra.sweeper.max_failure_rate={max_failure_rate}",
                       "error=true")
    ran = len(json.loads((tmp_path / "sweep" / "sweep.json").read_text())["jobs"])
    if max_failure_rate < 1.0:
        assert proc.returncode != 0 and "RuntimeError: cfg.error is True" in proc.stderr
        assert ran == 2  # the first batch
    else:
        assert proc.returncode == 0 and "RuntimeError: cfg.error is True" not in proc.stderr, proc.stderr[-2000:]
        assert ran == 20


@pytest.mark.slow
def test_ctrl_c_fails_this_invocations_running_trials_only(tmp_path):
    storage = f"sqlite:///{tmp_path}/ctrl-c.db"
    study = optuna.create_study(storage=storage, study_name="sphere")
    other = study.ask()  # a trial another worker is running on the same storage
    proc = subprocess.Popen([sys.executable, str(APPS / "sphere.py"), "-m", f"hydra.sweep.dir={tmp_path}/sweep",
                             f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=3", "sleep=60"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "sweep" / "0" / ".hydra").exists():  # the job started (and sleeps)
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        assert len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) == 2
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    trials = optuna.load_study(storage=storage, study_name="sphere").trials
    assert [(t.number, t.state) for t in trials] == [(other.number, TrialState.RUNNING), (1, TrialState.FAIL)]
