"""``hydra/launcher=slurm``: Hydra's submitit SLURM launcher, waiting for each job on its own.

Hydra's ``SlurmLauncher.launch`` ends with ``[job.results()[0] for job in jobs]``: a job that SLURM ends (its time
limit, ``scancel``, a lost node) raises there and ends the whole sweep with a traceback, and on a cluster without
accounting (``sacct`` off) submitit never learns that such a job has ended, so the command waits for ever. This
launcher submits the same job array (submitit's public ``AutoExecutor.map_array``, with the parameters Hydra's
launcher passes), then waits for each job: a job whose result file exists gives its ``JobReturn``; a job that
``squeue`` shows ended (or no longer shows) without one, or PENDING for a reason that never clears
(``PartitionConfig``: more than the partition has), is cancelled if need be and becomes a FAILED ``JobReturn`` whose
error says so in one line. The sweepers record it as any failed job, and the tracking callback closes its MLflow run,
which its killed process left RUNNING. Ctrl-C (or ``interrupt()`` from another thread: the asynchronous sweeper's
trial slots each wait in a thread) cancels the array's jobs that have not returned (``scancel``) before the sweep
ends, so nothing keeps running on the cluster for a sweep that is gone. Hydra instantiates only the launchers its
plugin scan found, so this module is scanned with the others: it imports Hydra, OmegaConf and Hydra's submitit
plugin (which the scan imports anyway); submitit itself is imported when a sweep launches.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# squeue's states of a job that will not run again (squeue -t all lists them for MinJobAge, 300 s by default)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
GONE = "GONE"  # no longer listed by squeue
# reasons of a PENDING job that no time clears: the request exceeds the partition (or names what does not exist)
NEVER = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
         "InvalidQOS"}
POLL_S = 2.0
# how long a result file may take to show on a shared file system once SLURM says the job completed
RESULT_GRACE_S = 30.0
ENDED_GRACE_S = 3.0  # after a state that ends a job without its result (CANCELLED, TIMEOUT, ...)


class SlurmJobEnded(RuntimeError):
    """SLURM ended a job (or will never start it) before it returned its result."""


class TolerantSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.interrupted = threading.Event()

    def __getstate__(self) -> dict:  # the launcher is pickled as each SLURM job's callable: the event stays here
        return {k: v for k, v in self.__dict__.items() if k != "interrupted"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, interrupted=threading.Event())

    def interrupt(self) -> None:
        """End every ``launch`` waiting in another thread as Ctrl-C would (its unfinished jobs cancelled)."""
        self.interrupted.set()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # on use, as Hydra's launcher does: the plugin scan stays fast

        assert self.config is not None and job_overrides
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        calls = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*calls))
        array = str(jobs[0].job_id).split("_")[0]
        log.info("SLURM job array %s: %d job(s), output in %s", array, len(jobs), sweep_dir)
        try:
            return wait(jobs, [list(o) for o in job_overrides], interrupted=self.interrupted)
        except KeyboardInterrupt:
            cancel_unreturned(array, jobs)
            raise


def cancel_unreturned(array: str, jobs: Sequence[Any]) -> None:
    """Ctrl-C: cancel the array (``scancel`` leaves its ended tasks as they are) when any job has not returned."""
    left = [job for job in jobs if not job.paths.result_pickle.exists()]
    if left:
        cancel(array)
        log.warning("interrupted: cancelled SLURM job array %s (%d of its %d job(s) had not returned)", array,
                    len(left), len(jobs))


def wait(jobs: Sequence[Any], overrides: list[list[str]], poll_s: float = POLL_S, sleep=time.sleep,
         interrupted: threading.Event | None = None) -> list[JobReturn]:
    """Each job's ``JobReturn``: its result, or a FAILED one for a job that SLURM ended or will never start. Raises
    KeyboardInterrupt when ``interrupted`` is set (checked at each poll)."""
    returns: dict[int, JobReturn] = {}
    ended: dict[int, float] = {}  # when squeue first showed the job ended without a result
    while len(returns) < len(jobs):
        if interrupted is not None and interrupted.is_set():
            raise KeyboardInterrupt
        states = squeue([job.job_id for i, job in enumerate(jobs) if i not in returns])  # before the result files
        for i, job in enumerate(jobs):
            if i in returns:
                continue
            if job.paths.result_pickle.exists():
                returns[i] = _returned(job, overrides[i])
                continue
            if states is None:  # squeue did not answer this time
                continue
            state, reason = states.get(str(job.job_id), (GONE, ""))
            if state == "PENDING" and reason in NEVER:
                cancel(str(job.job_id))
                returns[i] = failed(overrides[i], f"SLURM cannot start job {job.job_id} (PENDING, reason {reason}: "
                                                  "it asks for more than its partition has); lower "
                                                  "hydra.launcher.cpus_per_task, mem_gb, gpus_per_node or timeout_min")
            elif state in ENDED or state == GONE:
                first = ended.setdefault(i, time.monotonic())
                # a preempted job may be requeued; a completed one's result may still be on its way
                grace = RESULT_GRACE_S if state in ("COMPLETED", "PREEMPTED", GONE) else ENDED_GRACE_S
                if time.monotonic() - first >= grace:
                    why = state if not reason or reason == "None" else f"{state}, {reason}"
                    returns[i] = failed(overrides[i], f"SLURM ended job {job.job_id} ({why}) before it returned a "
                                                      f"result; its log: {job.paths.stderr}")
            else:  # PENDING, RUNNING, REQUEUED, ...: not ended (again)
                ended.pop(i, None)
        if len(returns) < len(jobs):
            sleep(poll_s)
    return [returns[i] for i in range(len(jobs))]


def _returned(job: Any, overrides: list[str]) -> JobReturn:
    try:
        return job.result()
    except Exception:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError: the job failed outside the task
        return failed(overrides, f"SLURM job {job.job_id} failed outside the task; its log: {job.paths.stderr}")


def failed(overrides: list[str], message: str) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = SlurmJobEnded(message)
    return ret


def cancel(job_id: str) -> None:
    try:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("scancel %s failed: %s", job_id, err)


_warned: list[str] = []


def squeue(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """``{job id: (state, reason)}`` of the arrays of ``job_ids`` (ended ones included); None when squeue fails."""
    arrays = sorted({str(j).split("_")[0] for j in job_ids})
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        done = subprocess.CompletedProcess([], 1, "", str(err))
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # every one of them ended long enough ago to be forgotten
            return {}
        if not _warned:
            _warned.append(done.stderr)
            log.warning("squeue failed (%s): waiting for the jobs' results", done.stderr.strip()[:200])
        return None
    states = {}
    for line in done.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            states[fields[0]] = (fields[1], fields[2])
    return states
