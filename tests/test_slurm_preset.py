"""hydra/launcher=slurm without a cluster: the request checked against `sinfo` before any job (one line naming what
to lower), `sbatch` missing (one line), the launcher's wait for each job (a job SLURM ended is one FAILED job), and the
parent side closing that job's MLflow run. The real cluster: tests/test_slurm.py (marker `slurm`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from app.errors import UserError
from app.sweeps import slurm
from app.tracking import calls
from hydra_plugins.madminer_sweeper import slurm_launcher

# the preset's request (conf/hydra/launcher/slurm.yaml) and the one-node cluster of workflow/slurm/local-cluster.sh
PRESET = {"partition": None, "timeout_min": 120, "cpus_per_task": 4, "gpus_per_node": 0, "tasks_per_node": 1,
          "nodes": 1, "mem_gb": 16}
ONE_NODE = "debug*|2|3900|(null)|infinite\n"


def test_the_request_is_checked_against_sinfo():
    with pytest.raises(UserError) as err:
        slurm.check(OmegaConf.create(PRESET), ONE_NODE)
    line = str(err.value)
    assert "\n" not in line and "PENDING" in line
    assert line.endswith("lower hydra.launcher.cpus_per_task=4 to 2, hydra.launcher.mem_gb=16 to 3")
    fits = slurm.check(OmegaConf.create({**PRESET, "cpus_per_task": 1, "mem_gb": 1}), ONE_NODE)
    assert (fits.name, fits.cpus, fits.mem_mb, fits.nodes) == ("debug", 2, 3900, 1)

    cluster = ("cpu*|64|256000|(null)|2-00:00:00\ncpu*|32|128000|(null)|2-00:00:00\n"
               "gpu|32|512000|gpu:a100:4(S:0-1)|12:00:00\n")
    assert slurm.check(OmegaConf.create(PRESET), cluster).cpus == 64  # the largest node of the default partition
    gpu = {**PRESET, "partition": "gpu", "gpus_per_node": 8, "timeout_min": 1000, "nodes": 2}
    with pytest.raises(UserError, match=r"lower hydra.launcher.gpus_per_node=8 to 4, hydra.launcher.nodes=2 to 1, "
                                        r"hydra.launcher.timeout_min=1000 to 720$"):
        slurm.check(OmegaConf.create(gpu), cluster)
    with pytest.raises(UserError, match=r"hydra.launcher.partition=big is not a partition of this cluster \(sinfo "
                                        r"lists cpu, gpu\)"):
        slurm.check(OmegaConf.create({**PRESET, "partition": "big"}), cluster)
    with pytest.raises(UserError, match="tasks_per_node=4 to 2"):
        slurm.check(OmegaConf.create({**PRESET, "tasks_per_node": 4, "cpus_per_task": 1, "mem_gb": 1}), ONE_NODE)


def test_a_time_limit_within_submitits_signal_delay_is_one_line():
    """timeout_min=1 with submitit's default signal_delay_s=120: USR2 came 5 s into each job, inside its MLflow calls
    (measured on the one-node cluster: the job's run was never created)."""
    request = OmegaConf.create({**PRESET, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 1, "signal_delay_s": 120})
    with pytest.raises(UserError, match=r"^hydra.launcher.signal_delay_s=120 is not less than "
                                        r"hydra.launcher.timeout_min=1 \(60 s\).*; "
                                        r"set hydra.launcher.signal_delay_s=15 or raise hydra.launcher.timeout_min$"):
        slurm.check(request, ONE_NODE)


@pytest.mark.parametrize(("limit", "minutes"), [("infinite", None), ("30", 30), ("30:00", 30), ("2:00:00", 120),
                                                ("1-00:00:00", 1440), ("1-12", 2160), ("1-0:30", 1470)])
def test_time_limits(limit, minutes):
    assert slurm.minutes(limit) == minutes


def test_gpus_in_gres():
    assert [slurm.gpus_of(g) for g in ("(null)", "gpu:4", "gpu:a100:4(S:0-1)", "gpu:2,shard:8", "gpu")] == \
        [0, 4, 4, 2, 1]


def _bin(folder: Path, **scripts: str) -> str:
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


def test_the_preset_on_a_machine_without_sbatch_is_one_line(run_app, tmp_path):
    proc = run_app("-m", "hydra/launcher=slurm", "stage=sample", check=False, env={"PATH": _bin(tmp_path / "bin")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs SLURM's sbatch, which is not on PATH here; run the sweep on a SLURM login "
        "node (workflow/slurm/local-cluster.sh starts a one-node cluster) or choose another launcher "
        "(hydra/launcher=joblib)"]


def test_the_preset_defaults_on_a_two_cpu_node_stop_before_any_job(run_app, tmp_path):
    """The preset's cluster defaults on the one-node cluster: one line, exit code 2, nothing submitted (the fake
    sbatch would leave a file)."""
    path = _bin(tmp_path / "bin", sbatch=f"touch {tmp_path}/submitted", sinfo=f"printf '{ONE_NODE}'")
    proc = run_app("-m", "hydra/launcher=slurm", "stage=sample", check=False, env={"PATH": path})
    assert proc.returncode == 2 and not (tmp_path / "submitted").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: hydra/launcher=slurm asks for more than partition debug has (1 node(s) of at most "
                           "2 CPUs, 3900 MB")
    assert line.endswith("lower hydra.launcher.cpus_per_task=4 to 2, hydra.launcher.mem_gb=16 to 3")


class _Job:
    def __init__(self, folder: Path, job_id: str, result: JobReturn | None = None):
        self.job_id, self._result = job_id, result
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl", stderr=folder / f"{job_id}.err")
        if result is not None:
            self.paths.result_pickle.write_text("done")

    def result(self):
        return self._result


def test_a_job_that_slurm_ends_is_one_failed_job_and_the_others_return(tmp_path, monkeypatch):
    finished = JobReturn(overrides=["a=0"], status=JobStatus.COMPLETED)
    finished.return_value = 0.5
    jobs = [_Job(tmp_path, "7_0", finished), _Job(tmp_path, "7_1"), _Job(tmp_path, "7_2"), _Job(tmp_path, "7_3")]
    states = {"7_1": ("CANCELLED", "None"), "7_2": ("PENDING", "PartitionConfig"), "7_3": ("RUNNING", "None")}
    cancelled = []
    monkeypatch.setattr(slurm_launcher, "squeue", lambda ids: {i: states[i] for i in ids if i in states})
    monkeypatch.setattr(slurm_launcher, "cancel", cancelled.append)
    monkeypatch.setattr(slurm_launcher, "ENDED_GRACE_S", 0.0)

    def later(_):  # the running job returns at the next poll
        jobs[3].paths.result_pickle.write_text("done")
        jobs[3]._result = finished

    returns = slurm_launcher.wait(jobs, [["a=0"], ["a=1"], ["a=2"], ["a=3"]], poll_s=0, sleep=later)
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.FAILED, JobStatus.COMPLETED]
    assert cancelled == ["7_2"]
    with pytest.raises(slurm_launcher.SlurmJobEnded, match=r"^SLURM ended job 7_1 \(CANCELLED\) before it returned"):
        _ = returns[1].return_value
    with pytest.raises(slurm_launcher.SlurmJobEnded, match=r"^SLURM cannot start job 7_2 \(PENDING, reason "
                                                           r"PartitionConfig"):
        _ = returns[2].return_value
    assert returns[1].overrides == ["a=1"]


def test_ctrl_c_cancels_the_jobs_that_have_not_returned(tmp_path, monkeypatch, caplog):
    """Ctrl-C while waiting (in the sweep's thread, or interrupt() from another thread: the asynchronous sweeper's
    slots): the array is cancelled when a job has not returned, and the interrupt goes on to the sweeper."""
    import threading

    finished = JobReturn(overrides=["a=0"], status=JobStatus.COMPLETED)
    jobs = [_Job(tmp_path, "9_0", finished), _Job(tmp_path, "9_1")]
    cancelled = []
    monkeypatch.setattr(slurm_launcher, "squeue", lambda ids: {i: ("RUNNING", "None") for i in ids})
    monkeypatch.setattr(slurm_launcher, "cancel", cancelled.append)
    event = threading.Event()

    def ctrl_c(_):
        raise KeyboardInterrupt

    for sleep, interrupted in ((ctrl_c, None), (lambda _: event.set(), event)):  # Ctrl-C / interrupt()
        cancelled.clear()
        with pytest.raises(KeyboardInterrupt):
            try:
                slurm_launcher.wait(jobs, [["a=0"], ["a=1"]], poll_s=0, sleep=sleep, interrupted=interrupted)
            except KeyboardInterrupt:
                slurm_launcher.cancel_unreturned("9", jobs)  # what launch() does
                raise
        assert cancelled == ["9"]
    assert "interrupted: cancelled SLURM job array 9 (1 of its 2 job(s) had not returned)" in caplog.text

    jobs[1].paths.result_pickle.write_text("done")  # every job returned: nothing to cancel
    cancelled.clear()
    slurm_launcher.cancel_unreturned("9", jobs)
    assert cancelled == []


class _Client:
    def __init__(self, runs):
        self.runs, self.batches, self.ended, self.filters = runs, [], [], []

    def search_runs(self, experiments, max_results, filter_string):
        self.filters.append(filter_string)
        return self.runs

    def log_batch(self, run_id, tags=()):
        self.batches.append((run_id, {t.key: t.value for t in tags}))

    def set_terminated(self, run_id, status):
        self.ended.append((run_id, status))


def test_the_parent_closes_the_runs_of_jobs_that_slurm_ended():
    def run(run_id, num):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags={"job.num": num}))

    client = _Client([run("r0", "0"), run("r1", "1")])  # both still RUNNING: job 0's end is still on its way
    closed = calls.close_failed_children(client, "p", "e", {1: "SlurmJobEnded: SLURM ended job 7_1 (CANCELLED)"})
    assert closed == ["r1"] and client.ended == [("r1", "FAILED")]
    assert client.batches == [("r1", {"error": "SlurmJobEnded: SLURM ended job 7_1 (CANCELLED)"})]
    assert client.filters == ["tags.mlflow.parentRunId = 'p' and attributes.status = 'RUNNING'"]
