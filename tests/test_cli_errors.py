"""Bad input: one line naming the problem and the fix, a non-zero exit, no traceback, no half result."""

from __future__ import annotations

import h5py
import pytest
from conftest import TINY


def _assert_clean_error(proc, *needles: str, code: int = 2):
    assert proc.returncode == code, proc.out[-3000:]
    assert "Traceback" not in proc.out, proc.out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_data_file(run_app, tmp_path):
    proc = run_app("data=file", f"data.path={tmp_path}/nope.h5", check=False)
    _assert_clean_error(proc, "not found", "data.path=")


def test_file_that_is_not_hdf5(run_app, tmp_path):
    path = tmp_path / "events.h5"
    path.write_text("not an hdf5 file\n")
    proc = run_app("data=file", f"data.path={path}", check=False)
    _assert_clean_error(proc, "not HDF5", str(path))


def test_hdf5_without_madminer_groups(run_app, tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["numbers"] = [1, 2, 3]
    proc = run_app("data=file", f"data.path={path}", check=False)
    _assert_clean_error(proc, "not a MadMiner event file", "parameters")


def test_unknown_training_preset(run_app):
    proc = run_app("training=magic", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.out
    assert "Could not find 'training/magic'" in proc.out and "alices" in proc.out


@pytest.mark.parametrize(
    "args,needles",
    [
        (["training=sally", "sampling=ratio"], ["sampling=local", "sampling=ratio"]),
        (["training=alices", "sampling=local"], ["sampling=ratio"]),
        (["sampling.theta0.priors=[[flat,-1,1],[flat,-1,1],[flat,-1,1]]"], ["sampling.theta0.priors", "2 parameters"]),
        (["sampling.theta0={type:morphing_point,values:[1,2,3]}"], ["wrong number of parameters"]),
        (["sampling.theta1.name=nope"], ["'nope'", "available: sm"]),
        (["evaluation.hist_vars=[nope]"], ["observable 'nope'", "pt_j1"]),
        (["evaluation.fisher.observable=nope"], ["observable 'nope'"]),
        (["evaluation.theta_true=[0,0,0]"], ["theta_true", "one value per parameter"]),
        (["sampling.n_samples=0"], ["sampling.n_samples must be positive"]),
        (["training.n_epochs=0"], ["training.n_epochs must be positive"]),
        (["evaluation.luminosity=-1"], ["evaluation.luminosity must be positive"]),
        (["training.estimator=quadratic_morphing_aware"], ["exactly 1 parameter", "data.n_parameters=1"]),
        (["training=sally", "training.estimator=parameterized"], ["cannot train method sally"]),
        (["training=sally", "evaluation.modes=[ml]"], ["needs a ratio or density model"]),
        (["objective.metric=val_los"], ["objective.metric=val_los", "val_loss"]),
        (["stage=train", "sampling.samples_dir=/nonexistent"], ["sampling.samples_dir=/nonexistent", "not a folder"]),
    ],
)
def test_bad_config_values(run_app, tmp_path, args, needles):
    proc = run_app(*TINY, *args, check=False)
    _assert_clean_error(proc, *needles)
    # nothing a later stage would trust was written
    run_dir = tmp_path / "run"
    assert not (run_dir / "samples").exists() and not (run_dir / "model").exists()


def test_objective_metric_must_exist(run_app, tmp_path):
    proc = run_app(*TINY, "objective.metric=limits_nope", "evaluation.fisher.enabled=false", check=False)
    _assert_clean_error(proc, "objective.metric=limits_nope", "val_loss")
