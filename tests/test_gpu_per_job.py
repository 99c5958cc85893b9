"""One GPU per job (app.ml.device.job_gpu), on a faked node: torch.cuda reports GPUs that are not there, so the
choice and its record are checked without one. bench/gpu_check.sh checks it on a GPU machine."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from app.ml import device


@pytest.fixture
def fake_gpus(monkeypatch):
    """A node whose torch sees ``n`` GPUs (set the count through the returned dict); the current device is tracked."""
    import torch

    state = {"count": 3, "current": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: state.update(current=index))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    for name in ("CUDA_VISIBLE_DEVICES", *device.SLURM_GPU_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return state


def test_jobs_running_at_once_each_take_their_own_gpu(tmp_path, fake_gpus):
    slots = tmp_path / "sweep" / ".gpu_slots"
    with ExitStack() as jobs:  # four jobs at once (each slot is its own lock file: as well between processes)
        found = []
        for job in range(4):
            found.append(jobs.enter_context(device.job_gpu("auto", slots, job_num=job)))
            assert fake_gpus["current"] == found[-1]["index"]  # torch's current device while the job runs
        assert [r["index"] for r in found] == [0, 1, 2, 0]
        assert found[1]["assigned"].startswith("slot 1 of 3 on ") and found[1]["name"] == "Fake GPU 1"
        assert found[3]["assigned"] == "shared: every one of the 3 GPUs was taken, job 3 modulo 3"
    assert fake_gpus["current"] == 0  # restored
    with device.job_gpu("cuda", slots, job_num=7) as again:  # the slots were freed with their jobs
        assert again["index"] == 0
    with device.job_gpu("cpu", slots) as none:
        assert none is None


def test_a_slurm_task_or_a_single_run_takes_the_gpu_it_sees(tmp_path, fake_gpus, monkeypatch):
    fake_gpus.update(count=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # SLURM with gpus_per_task=1: this task's GPU only
    monkeypatch.setenv("SLURM_STEP_GPUS", "3")
    with device.job_gpu("auto", tmp_path / ".gpu_slots", job_num=5) as record:
        assert record == {
            "index": 0,
            "name": "Fake GPU 0",
            "assigned": "the only GPU this job sees",
            "count": 1,
            "cuda_visible_devices": "3",
            "slurm_step_gpus": "3",
        }
    fake_gpus.update(count=2, current=1)
    with device.job_gpu("auto", None) as record:
        assert record["index"] == 1 and record["assigned"] == "a single run: torch's current device"
