"""The end of a sweep (app.sweeps.report): the table, one line per failed job, exit codes. In-process, on sweep
records and job folders as the sweepers and the pipeline write them."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from app.store.files import write_json
from app.sweeps.outcomes import FAILED, FINISHED, JobOutcome, SweepRecord, load
from app.sweeps.report import SweepReport, summary


def _sweep(tmp_path: Path, jobs: list[tuple], **record) -> SweepRecord:
    """jobs: (status, objective, method, metric, alpha) each; every job shares seed=1 (not shown in the table)."""
    sweep = SweepRecord(str(tmp_path / "sweep"), **record)
    for num, (status, value, method, metric, alpha) in enumerate(jobs):
        out = tmp_path / "sweep" / str(num)
        write_json(out / "run.json", {"method": method, "objective": {"metric": metric, "direction": "minimize"},
                                      "cache": {"sample": {"key": "same-samples"}}})
        (out / ".hydra").mkdir()
        (out / ".hydra" / "config.yaml").write_text(f"training:\n  alpha: {alpha}\n")
        sweep.jobs.append(JobOutcome(num, ["seed=1", f"training={method}", f"training.alpha={alpha}"], status,
                                     value if status == FINISHED else None,
                                     None if status == FINISHED else "TrainingFailed: training diverged", str(out)))
    sweep.save()
    return sweep


def _config(tmp_path: Path, tracking: str = "local", **sweeper) -> OmegaConf:
    return OmegaConf.create({
        "hydra": {"sweep": {"dir": str(tmp_path / "sweep")},
                  "sweeper": {"_target_": "hydra_plugins.madminer_sweeper.grid.TolerantSweeper", **sweeper}},
        "tracking": {"mode": tracking, "uri": "sqlite:///mlflow.db"}})


def test_a_comparable_objective_shows_every_job_and_the_best(tmp_path):
    record = _sweep(tmp_path, [(FINISHED, 2.5, "alices", "limits_cl68_area", 1), (FAILED, None, "sally", "", 1),
                               (FINISHED, 1.25, "sally", "limits_cl68_area", 1)])
    text = summary(record, "compare runs: mlflow ui ...")
    assert text.splitlines() == [
        "sweep: 3 jobs: 2 finished, 1 failed, 0 pruned",
        "  job  status    limits_cl68_area  overrides",
        "    0  finished  2.5               training=alices",
        "    1  failed    -                 training=sally",
        "    2  finished  1.25 (best)       training=sally",
        f"outputs: {tmp_path / 'sweep'}",
        "compare runs: mlflow ui ...",
    ]


def test_objectives_that_do_not_compare_show_the_best_per_method(tmp_path):
    record = _sweep(tmp_path, [(FINISHED, 0.7, "alices", "val_improved_xe", 1),
                               (FINISHED, 0.6, "alices", "val_improved_xe", 10),
                               (FINISHED, 0.2, "sally", "val_mse_score", 1),
                               (FINISHED, 0.1, "sally", "val_mse_score", 1)])
    lines = summary(record).splitlines()
    assert lines[0] == "sweep: 4 jobs: 4 finished, 0 failed, 0 pruned"
    assert lines[1].startswith("best per method (each method was scored with its own metric (val_improved_xe, "
                               "val_mse_score), which are not comparable")
    assert lines[2:5] == ["  method  job  objective            overrides",
                          "  alices    1  val_improved_xe=0.6  training=alices training.alpha=10",
                          "  sally     3  val_mse_score=0.1    training=sally training.alpha=1"]
    assert not any("compare runs" in line for line in lines)  # tracking disabled: no ui line


def test_the_alpha_weighted_loss_names_no_best(tmp_path):
    record = _sweep(tmp_path, [(FINISHED, 0.7, "alices", "val_loss", 1), (FINISHED, 3.0, "alices", "val_loss", 10)])
    lines = summary(record).splitlines()
    assert lines[1].startswith("no best job: val_loss = first term + alpha * score term shrinks with alpha")
    assert "(best)" not in "\n".join(lines) and lines[3].split()[:3] == ["0", "finished", "0.7"]


def test_a_long_sweep_shows_its_best_jobs(tmp_path):
    record = _sweep(tmp_path, [(FINISHED, float(30 - i), "alices", "limits_cl68_area", i) for i in range(25)])
    lines = summary(record).splitlines()
    shown = [int(line.split()[0]) for line in lines[2:12]]
    assert shown == list(range(24, 14, -1)) and "(best)" in lines[2]
    assert lines[12] == "(the 10 best of 25 jobs; all of them: sweep.json in the outputs folder)"


def test_failed_jobs_end_the_sweep_with_one_line_each_and_exit_1(tmp_path, capsys):
    _sweep(tmp_path, [(FAILED, None, "alices", "", 1), (FINISHED, 0.5, "alices", "val_improved_xe", 2),
                      (FAILED, None, "alices", "", 3)])
    with pytest.raises(SystemExit) as done:
        SweepReport().on_multirun_end(_config(tmp_path))
    out, err = capsys.readouterr()
    assert done.value.code == 1
    assert err.splitlines() == ["failed: job 0 [training.alpha=1]: TrainingFailed: training diverged",
                                "failed: job 2 [training.alpha=3]: TrainingFailed: training diverged"]
    ui = "compare runs: mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"
    assert out.count("compare runs:") == 1 and out.splitlines()[-1].startswith(ui)


def test_a_sweep_without_failures_ends_quietly(tmp_path, capsys):
    _sweep(tmp_path, [(FINISHED, 0.5, "alices", "val_improved_xe", 1)])
    SweepReport().on_multirun_end(_config(tmp_path, tracking="disabled"))
    out, err = capsys.readouterr()
    assert out.startswith("sweep: 1 jobs: 1 finished, 0 failed, 0 pruned") and err == ""


def test_the_ui_line_names_the_store_of_mlflow_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    _sweep(tmp_path, [(FINISHED, 0.5, "alices", "val_improved_xe", 1)])
    SweepReport().on_multirun_end(_config(tmp_path))
    assert f"--backend-store-uri sqlite:///{tmp_path}/m.db " in capsys.readouterr().out


def test_mlflow_calls_that_failed_end_the_sweep_with_exit_1(tmp_path, capsys):
    from app.sweeps.outcomes import add_tracking_errors

    _sweep(tmp_path, [(FINISHED, 0.5, "alices", "val_improved_xe", 1)])
    add_tracking_errors(tmp_path / "sweep", ["MLflow log_batch failed: the store went away"])
    assert load(tmp_path / "sweep").tracking_errors == ["MLflow log_batch failed: the store went away"]
    with pytest.raises(SystemExit) as done:
        SweepReport().on_multirun_end(_config(tmp_path))
    assert done.value.code == 1 and "error: 0 of 1 jobs failed; 1 MLflow call(s) failed" in capsys.readouterr().err


def test_a_sweep_of_another_sweeper_is_left_to_hydra(tmp_path, capsys):
    SweepReport().on_multirun_end(_config(tmp_path))  # no sweep.json
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("option, value, allowed", [("max_failure_rate", 2, "[0.0, 1.0]"),
                                                     ("max_batch_size", 0, ">= 1"), ("n_trials", 0, ">= 1"),
                                                     ("n_jobs", -1, ">= 1")])
def test_sweeper_options_out_of_range_stop_before_any_job(tmp_path, capsys, option, value, allowed):
    with pytest.raises(SystemExit) as done:
        SweepReport().on_multirun_start(_config(tmp_path, **{option: value}))
    assert done.value.code == 2
    assert capsys.readouterr().err == (f"error: hydra.sweeper.{option}={value} is outside its range {allowed}; set "
                                       f"hydra.sweeper.{option}=<a value in {allowed}>\n")


def test_a_direction_that_is_neither_minimize_nor_maximize_stops_before_any_job(tmp_path, capsys):
    with pytest.raises(SystemExit):
        SweepReport().on_multirun_start(_config(tmp_path, direction="smaller"))
    assert capsys.readouterr().err.startswith("error: hydra.sweeper.direction=smaller is not minimize or maximize")


def test_the_joblib_launchers_idle_workers_end_with_the_sweep(tmp_path):
    """loky keeps them (joining them only at interpreter exit, seconds with torch loaded): the report ends them."""
    import os

    from joblib import Parallel, delayed

    from app.sweeps.report import _release_joblib_workers

    workers = set(Parallel(n_jobs=2, backend="loky")(delayed(os.getpid)() for _ in range(4))) - {os.getpid()}
    assert workers
    _release_joblib_workers(OmegaConf.create({"hydra": {"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher"
                                                                                 ".joblib_launcher.JoblibLauncher"}}}))
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
