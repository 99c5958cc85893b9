"""Bad input, table-driven: every row is one command a user could type and what it must end in.

Each row: the command (``python -m app`` + TINY + the row's arguments), a fragment of the expected
message, a non-zero exit code, no ``Traceback`` (unless the row sets HYDRA_FULL_ERROR=1), nothing a
later stage would trust left behind, and, where the row turns tracking on (``tracking=local`` with a
sqlite store in the test's tmp dir), the MLflow run ends FAILED (or no run exists when the command
stops before the job). docs/reliability.md is the same table in words; a test keeps them in step.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, TINY

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TINY_FILE = [a for a in TINY if not a.startswith("data.")]  # data=file has no toy settings


# --------------------------------------------------------------------------- damaged event files
def _file_case(build: Callable[[Path, Path], None], name: str = "events.h5"):
    """setup: build a damaged copy of the toy at tmp/NAME, then run on it with data=file."""

    def setup(tmp: Path, toy: Path) -> list[str]:
        path = tmp / name
        build(toy, path)
        return ["data=file", f"data.path={path}"]

    return setup


def _cut_short(toy: Path, path: Path) -> None:
    data = toy.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy


def _zero_bytes(toy: Path, path: Path) -> None:
    path.write_bytes(b"")


def _wrong_magic(toy: Path, path: Path) -> None:
    data = toy.read_bytes()
    assert data.startswith(HDF5_SIGNATURE)
    path.write_bytes(b"NOT-HDF5" + data[8:])


def _edit_copy(edit: Callable[[h5py.File], None]) -> Callable[[Path, Path], None]:
    def build(toy: Path, path: Path) -> None:
        shutil.copy(toy, path)
        with h5py.File(path, "a") as f:
            edit(f)

    return build


def _no_events(f: h5py.File) -> None:
    for name in ("observations", "weights", "sampling_benchmarks"):
        shape, dtype = f["samples"][name].shape, f["samples"][name].dtype
        del f["samples"][name]
        f["samples"].create_dataset(name, shape=(0, *shape[1:]), dtype=dtype)


def _no_benchmarks(f: h5py.File) -> None:
    for name in list(f["benchmarks"]):
        shape, dtype = f["benchmarks"][name].shape, f["benchmarks"][name].dtype
        del f["benchmarks"][name]
        f["benchmarks"].create_dataset(name, shape=(0, *shape[1:]), dtype=dtype)


def _no_benchmarks_group(f: h5py.File) -> None:
    del f["benchmarks"]


def _weights(value: float, dataset: str = "samples/weights") -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        w = f[dataset][()]
        w[::9, 0] = value  # one event in nine
        f[dataset][...] = w

    return edit


def _a_directory(toy: Path, path: Path) -> None:
    path.mkdir()
    shutil.copy(toy, path / "inside.h5")


def _unreadable(toy: Path, path: Path) -> None:
    shutil.copy(toy, path)
    path.chmod(0)


def _plain_hdf5(toy: Path, path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["numbers"] = [1, 2, 3]


def _text_file(toy: Path, path: Path) -> None:
    path.write_text("not an hdf5 file\n")


# --------------------------------------------------------------------------- folders
def _file_in_the_way(key: str) -> Callable[[Path, Path], list[str]]:
    """key=<tmp>/afile/sub: a folder that cannot be created because a file is in the way."""

    def setup(tmp: Path, toy: Path) -> list[str]:
        (tmp / "afile").write_text("")
        return [f"{key}={tmp}/afile/sub"]

    return setup


def _a_file(name: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, toy: Path) -> list[str]:
        (tmp / name).write_text("")
        return []

    return setup


def _read_only_dir(key: str) -> Callable[[Path, Path], list[str]]:
    def setup(tmp: Path, toy: Path) -> list[str]:
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
        return [f"{key}={tmp}/ro/sub"]

    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    args: list[str]
    needles: list[str]
    setup: Callable[[Path, Path], list[str]] | None = None  # (tmp, toy file) -> extra args
    tracking: bool = False  # tracking=local in tmp: the run must end FAILED (or not exist)
    run_in_job: bool = True  # fails inside the job (a FAILED run) rather than before it (no run)
    hydra_message: bool = False  # Hydra's own composition error: several lines, no "error:" line
    runner: str | None = None  # "unprivileged" | "tmpfs" | "fsize"
    env: dict = field(default_factory=dict)
    multirun: bool = False
    max_seconds: float | None = None
    traceback: bool = False  # HYDRA_FULL_ERROR=1 rows: the traceback is wanted

    @property
    def marks(self) -> list:
        """The slow tier for rows that import MLflow, run under a resource limit or open Optuna's storage (3-6 s
        each); the others fail before any work, in under a second."""
        slow = self.tracking or self.runner or any(a.startswith("hparams_search=") for a in self.args)
        return [pytest.mark.slow] if slow else []


CASES = [
    # ---- the event file: every way it can fail to be what it claims
    Case("missing-file", ["data=file", "data.path={tmp}/nope.h5"], ["not found", "data.path="]),
    Case("not-hdf5-text", [], ["not HDF5", "events.h5"], _file_case(_text_file)),
    Case("hdf5-not-madminer", [], ["not a MadMiner event file", "parameters"], _file_case(_plain_hdf5)),
    Case("hdf5-cut-short", [], ["damaged or incomplete", "truncated", "copy or write the file again"],
         _file_case(_cut_short), tracking=True),
    Case("hdf5-zero-bytes", [], ["empty (0 bytes)", "events.h5"], _file_case(_zero_bytes)),
    Case("hdf5-wrong-magic", [], ["not HDF5 (wrong signature)"], _file_case(_wrong_magic)),
    Case("madminer-no-events", [], ["has no events", "after event reading"], _file_case(_edit_copy(_no_events))),
    Case("madminer-no-benchmarks", [], ["has no benchmarks", "add_benchmark"],
         _file_case(_edit_copy(_no_benchmarks))),
    Case("madminer-no-benchmarks-group", [], ["missing groups: benchmarks"],
         _file_case(_edit_copy(_no_benchmarks_group))),
    Case("data-path-is-directory", [], ["is a directory", "data.path"], _file_case(_a_directory)),
    Case("data-file-unreadable", [], ["cannot read data file", "Permission denied", "chmod u+r"],
         _file_case(_unreadable), runner="unprivileged"),
    Case("weights-nan", [], ["NaN or inf in samples/weights", "445 of 4000 events"],
         _file_case(_edit_copy(_weights(np.nan))), tracking=True),
    Case("weights-inf", [], ["NaN or inf in samples/weights"], _file_case(_edit_copy(_weights(np.inf)))),
    Case("observations-nan", [], ["NaN or inf in samples/observations"],
         _file_case(_edit_copy(_weights(np.nan, "samples/observations")))),
    # ---- options: composition (Hydra: types, keys, choices), ranges and values (app.domain.validate, before any work)
    Case("unknown-preset", ["training=magic"], ["Could not find 'training/magic'", "alices"],
         hydra_message=True, tracking=True, run_in_job=False),
    Case("unknown-key", ["training.nope=1"], ["Key 'nope' not in 'TrainingConfig'", "+training.nope"],
         hydra_message=True, tracking=True, run_in_job=False),
    Case("wrong-type", ["training.n_epochs=abc"], ["'abc'", "could not be converted to Integer"],
         hydra_message=True),
    Case("wrong-enum", ["training.optimizer=adamw"], ["Invalid value 'adamw'", "amsgrad"], hydra_message=True),
    Case("nan-option", ["training.alpha=nan"], ["training.alpha=nan is not a finite number"], tracking=True),
    Case("inf-option", ["evaluation.luminosity=inf"], ["evaluation.luminosity=inf is not a finite number"]),
    Case("nan-in-list-option", ["evaluation.theta_true=[nan,0]"], ["evaluation.theta_true[0]=nan"]),
    Case("sally-with-ratio-sampling", ["training=sally", "sampling=ratio"], ["sampling=local", "sampling=ratio"]),
    Case("alices-with-local-sampling", ["training=alices", "sampling=local"], ["sampling=ratio"]),
    Case("grid-ranges-not-numbers", ["evaluation.grid.ranges=[[-1,a],[-2,2]]"],
         ["evaluation.grid.ranges must be 2 pairs [min, max]"]),
    Case("priors-wrong-count", ["sampling.theta0.priors=[[flat,-1,1],[flat,-1,1],[flat,-1,1]]"],
         ["sampling.theta0.priors", "2 parameters"]),
    Case("theta-wrong-length", ["sampling.theta0={type:morphing_point,values:[1,2,3]}"],
         ["wrong number of parameters"]),
    Case("unknown-benchmark", ["sampling.theta1.name=nope"], ["'nope'", "available: sm"]),
    Case("unknown-hist-observable", ["evaluation.hist_vars=[nope]"], ["observable 'nope'", "pt_j1"]),
    Case("unknown-fisher-observable", ["evaluation.fisher.observable=nope"], ["observable 'nope'"]),
    Case("theta-true-wrong-length", ["evaluation.theta_true=[0,0,0]"], ["theta_true", "one value per parameter"]),
    Case("zero-samples", ["sampling.n_samples=0"], ["sampling.n_samples=0 is out of range", "an integer >= 1"]),
    Case("zero-epochs", ["training.n_epochs=0"], ["training.n_epochs=0 is out of range", "an integer >= 1"]),
    Case("negative-luminosity", ["evaluation.luminosity=-1"],
         ["evaluation.luminosity=-1.0 is out of range", "a number > 0"], tracking=True),
    Case("quadratic-on-2-parameters", ["training.estimator=quadratic_morphing_aware"],
         ["exactly 1 parameter", "data.n_parameters=1"]),
    Case("estimator-for-other-method", ["training=sally", "training.estimator=parameterized"],
         ["cannot train method sally"]),
    Case("mode-for-other-method", ["training=sally", "evaluation.modes=[ml]"], ["needs a ratio or density model"]),
    Case("objective-direction-contradiction", ["objective.metric=truth_limits_iou", "objective.direction=minimize"],
         ["objective.direction=minimize contradicts", "set objective.direction=maximize"]),
    Case("objective-typo", ["objective.metric=val_los"], ["objective.metric=val_los", "val_loss"]),
    Case("objective-unknown-limits-metric", ["objective.metric=limits_nope", "evaluation.fisher.enabled=false"],
         ["objective.metric=limits_nope", "val_loss"]),
    Case("objective-term-of-another-method", ["objective.metric=val_xe"], ["has no loss term xe", "val_improved_xe"]),
    Case("samples-dir-missing", ["stage=train", "sampling.samples_dir=/nonexistent"],
         ["sampling.samples_dir=/nonexistent cannot be trusted", "not a folder"]),
    # ---- where results and caches go
    Case("output-dir-blocked-by-file", [], ["cannot create or write the output dir", "hydra.run.dir="],
         _file_in_the_way("hydra.run.dir"), tracking=True, run_in_job=False),
    Case("sweep-dir-blocked-by-file", ["training=alices,sally", "hydra.sweep.dir={tmp}/afile/sweep"],
         ["cannot create or write the output dir", "hydra.sweep.dir="], _a_file("afile"), multirun=True,
         tracking=True, run_in_job=False),
    Case("output-dir-read-only", [], ["cannot create or write the output dir", "Permission denied"],
         _read_only_dir("hydra.run.dir"), runner="unprivileged"),
    Case("cache-dir-blocked-by-file", [], ["cannot write", "paths.cache_dir="],
         _file_in_the_way("paths.cache_dir"), tracking=True),
    Case("cache-dir-read-only", [], ["Permission denied", "paths.cache_dir="],
         _read_only_dir("paths.cache_dir"), runner="unprivileged"),
    Case("disk-full-while-sampling", [], ["no space left while writing", "hydra.run.dir="], runner="tmpfs",
         tracking=True),
    Case("file-size-limit-while-sampling", ["sampling.n_samples=3000"], ["no space left while writing"],
         runner="fsize"),
    Case("file-size-limit-while-training", ["training.n_hidden=[200,200]"],
         ["no space left while writing the train stage's files"], runner="fsize"),
    Case("full-error-shows-traceback", [], ["NotADirectoryError"], _file_in_the_way("hydra.run.dir"),
         env={"HYDRA_FULL_ERROR": "1"}, hydra_message=True, traceback=True),
    # ---- services
    Case("optuna-storage-cannot-open",
         ["hparams_search=alices_optuna", "hydra.sweeper.storage=sqlite:///{tmp}/afile/optuna.db",
          "hydra.sweeper.n_trials=1"],
         ["Optuna storage", "cannot be opened", "hydra.sweeper.storage"],
         _a_file("afile"), multirun=True, tracking=True, run_in_job=False),
    Case("optuna-storage-refused",
         ["hparams_search=alices_optuna", "hydra.sweeper.storage=postgresql://bob:pw@127.0.0.1:{port}/x",
          "hydra.sweeper.n_trials=1"],
         ["postgresql://***@127.0.0.1", "cannot be opened"], multirun=True),
    Case("tracking-server-unreachable", ["tracking=server"], ["unreachable", "http://127.0.0.1:"],
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, max_seconds=15),
]


def test_the_table_covers_the_issue():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


def test_docs_table_lists_every_row():
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/reliability.md lacks rows: {missing}"


# --------------------------------------------------------------------------- runners
@pytest.fixture(scope="session")
def toy_file(cache_dir) -> Path:
    """The TINY toy file, in the session cache the CLI uses too."""
    from app.toy import simulator

    return simulator.ensure_toy_file(simulator.ToySettings(n_events=4000), cache_dir)


def _unprivileged() -> list[str]:
    """A prefix that makes file permissions apply: none for a normal user; for root, drop the capabilities
    that bypass them (DAC_OVERRIDE, DAC_READ_SEARCH) with setpriv."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    return prefix


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A size-limited tmpfs at ``path`` (root with mount rights only)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the fsize row covers a full disk without it")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _limit_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn: files may not grow past ``limit`` bytes (write() then fails; Python ignores SIGXFSZ)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("madminer-sweeper")
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=100)


def _half_results(run_dir: Path) -> list[str]:
    """Anything a later stage would trust although the run failed: temp folders, or a stage folder
    without its completion marker."""
    if not run_dir.is_dir():
        return []
    bad = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    markers = {"samples": "samples.json", "model": "model.json", "results": "metrics.json"}
    bad += [d for d, m in markers.items() if (run_dir / d).is_dir() and not (run_dir / d / m).exists()]
    return bad


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path, cache_dir, toy_file):
    port = str(_free_port())
    def fill(text: str) -> str:  # not str.format: overrides such as {type:benchmark} hold braces
        return text.replace("{tmp}", str(tmp_path)).replace("{port}", port)

    args = [fill(a) for a in case.args]
    extra = case.setup(tmp_path, toy_file) if case.setup else []
    base = TINY_FILE if "data=file" in args + extra else TINY
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "app", *(["-m"] if case.multirun else []), *base, *extra, *args]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if case.tracking:
        cmd += ["tracking=local", f"tracking.uri={uri}"]
    elif not any(a.startswith("tracking=") for a in args):
        cmd.append("tracking=disabled")
    if case.multirun and not any(a.startswith("hydra.sweep.dir=") for a in extra + args):
        cmd.append(f"hydra.sweep.dir={tmp_path}/sweep")

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    env.update({k: fill(v) for k, v in case.env.items()})
    env.update(MADMINER_SWEEPER_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    prefix, preexec = [], None
    with contextlib.ExitStack() as stack:
        if case.runner == "unprivileged":
            prefix = _unprivileged()
        elif case.runner == "tmpfs":
            # room for .hydra/, the log and run.json, not for the samples
            run_dir = stack.enter_context(_tmpfs(tmp_path / "disk", "48k")) / "run"
        elif case.runner == "fsize":
            # logs, configs and TINY samples (10 kB a file) fit; 3000 samples (48 kB a file) or a [200,200]
            # network (170 kB of weights, written by torch.save) do not
            preexec = _limit_file_size(32 * 1024)
        if not case.multirun and not any(a.startswith("hydra.run.dir=") for a in extra + args):
            cmd.append(f"hydra.run.dir={run_dir}")
        start = time.time()
        proc = subprocess.run([*prefix, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, preexec_fn=preexec)
        elapsed = time.time() - start
        out = proc.stdout + proc.stderr
        leftovers = _half_results(run_dir)

    assert proc.returncode != 0, out[-3000:]
    assert ("Traceback" in out) == case.traceback, out[-3000:]
    if case.hydra_message:
        for needle in case.needles:
            assert needle in out, (needle, out[-3000:])
    else:
        assert proc.returncode == 2, out[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for needle in case.needles:
            assert needle in errors[0], (needle, errors[0])
    assert not leftovers, leftovers
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, elapsed
    if case.tracking:
        runs = _runs(uri) if (tmp_path / "mlflow.db").exists() else []
        assert [r.info.status for r in runs] == (["FAILED"] if case.run_in_job else []), runs
        if case.run_in_job:
            assert case.needles[0] in runs[0].data.tags["error"], runs[0].data.tags
