"""``hydra/launcher=slurm``: the request checked against the cluster before any job is submitted.

SLURM accepts a job array that no node of its partition can run and leaves it PENDING (reason ``PartitionConfig``)
for ever: the preset's cluster defaults (4 CPUs and 16 GB per job) on a 2-CPU node would wait with no word.
:func:`check` reads ``sinfo`` (each node of the partition: CPUs, memory, GPUs; the partition's time limit) and
raises :class:`UserError` with one line that names each option to lower and to what; a machine without ``sbatch``
gets one line too. ``app.main.Preflight`` calls it when a sweep starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from app.errors import UserError, first_line

SINFO = ["sinfo", "-h", "-a", "-N", "-o", "%P|%c|%m|%G|%l"]  # one line per node and partition


@dataclass
class Partition:
    name: str
    default: bool = False
    nodes: int = 0
    cpus: int = 0  # of its largest node
    mem_mb: int = 0
    gpus: int = 0
    limit_min: int | None = None  # None: no time limit

    def describe(self) -> str:
        limit = "no time limit" if self.limit_min is None else f"time limit {self.limit_min} min"
        return (f"{self.nodes} node(s) of at most {self.cpus} CPUs, {self.mem_mb} MB, {self.gpus} GPUs; {limit}")


def is_slurm(launcher: Any) -> bool:
    """Whether ``hydra.launcher`` submits to SLURM (this project's preset or Hydra's ``submitit_slurm``)."""
    return launcher is not None and str(launcher.get("_target_", "") or "").endswith("SlurmLauncher")


def check(launcher: Any, sinfo_output: str | None = None) -> Partition:
    """Raise UserError (one line) for a request that no node of the partition can run; returns the partition."""
    if sinfo_output is None:
        sinfo_output = _sinfo()
    partitions = parse(sinfo_output)
    name = launcher.get("partition")
    if name is None:
        part = next((p for p in partitions.values() if p.default), None)
        if part is None:
            raise UserError("hydra/launcher=slurm: this cluster has no default partition; set "
                            f"hydra.launcher.partition=<one of {', '.join(partitions) or '(none: sinfo lists none)'}>")
    elif str(name) not in partitions:
        raise UserError(f"hydra.launcher.partition={name} is not a partition of this cluster (sinfo lists "
                        f"{', '.join(partitions) or 'none'}); set hydra.launcher.partition=<one of them>")
    else:
        part = partitions[str(name)]
    _check_signal_delay(launcher)
    lower = too_much(launcher, part)
    if lower:
        raise UserError(f"hydra/launcher=slurm asks for more than partition {part.name} has ({part.describe()}: "
                        f"sinfo), so its jobs would stay PENDING for ever; lower {', '.join(lower)}")
    return part


def _check_signal_delay(launcher: Any) -> None:
    """submitit asks SLURM for its USR2 ``signal_delay_s`` before the time limit: a limit no longer than that sends it
    as the job starts, and submitit's handler then raises inside whatever the job runs (its MLflow calls)."""
    delay, timeout = launcher.get("signal_delay_s"), launcher.get("timeout_min")
    if delay is not None and timeout is not None and int(delay) >= int(timeout) * 60:
        raise UserError(f"hydra.launcher.signal_delay_s={delay} is not less than hydra.launcher.timeout_min={timeout} "
                        f"({int(timeout) * 60} s): submitit's time-limit signal would come as each job starts; set "
                        f"hydra.launcher.signal_delay_s={int(timeout) * 60 // 4} or raise hydra.launcher.timeout_min")


def too_much(launcher: Any, part: Partition) -> list[str]:
    """``hydra.launcher.KEY=VALUE to MAX`` for each option that asks for more than the partition has."""
    tasks = int(launcher.get("tasks_per_node") or 1)
    cpus = int(launcher.get("cpus_per_task") or 1)
    lower = []
    if tasks > part.cpus:
        lower.append(f"hydra.launcher.tasks_per_node={tasks} to {part.cpus}")
    elif cpus * tasks > part.cpus:
        lower.append(f"hydra.launcher.cpus_per_task={cpus} to {part.cpus // tasks}")
    mem_gb = launcher.get("mem_gb")
    if mem_gb is not None and int(mem_gb) * 1024 > part.mem_mb:
        lower.append(f"hydra.launcher.mem_gb={mem_gb} to {part.mem_mb // 1024}")
    gpus = launcher.get("gpus_per_node")
    if gpus and int(gpus) > part.gpus:
        lower.append(f"hydra.launcher.gpus_per_node={gpus} to {part.gpus}")
    nodes = int(launcher.get("nodes") or 1)
    if nodes > part.nodes:
        lower.append(f"hydra.launcher.nodes={nodes} to {part.nodes}")
    timeout = launcher.get("timeout_min")
    if timeout is not None and part.limit_min is not None and int(timeout) > part.limit_min:
        lower.append(f"hydra.launcher.timeout_min={timeout} to {part.limit_min}")
    return lower


def _sinfo() -> str:
    if shutil.which("sbatch") is None:
        raise UserError("hydra/launcher=slurm needs SLURM's sbatch, which is not on PATH here; run the sweep on a "
                        "SLURM login node (workflow/slurm/local-cluster.sh starts a one-node cluster) or choose "
                        "another launcher (hydra/launcher=joblib)")
    try:
        done = subprocess.run(SINFO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"hydra/launcher=slurm: sinfo did not answer ({first_line(err)}); check that SLURM's "
                        "controller (slurmctld) is reachable from here") from None
    if done.returncode != 0:
        why = first_line(RuntimeError(done.stderr)) if done.stderr.strip() else f"exit code {done.returncode}"
        raise UserError(f"hydra/launcher=slurm: sinfo failed ({why}); check that SLURM's controller (slurmctld) is "
                        "reachable from here")
    return done.stdout


def parse(output: str) -> dict[str, Partition]:
    """The partitions of ``sinfo -h -a -N -o '%P|%c|%m|%G|%l'`` (the default one's name ends with ``*``)."""
    partitions: dict[str, Partition] = {}
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, mem, gres, limit = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        part = partitions.setdefault(name, Partition(name, default, limit_min=minutes(limit)))
        part.default = part.default or default
        part.nodes += 1
        part.cpus = max(part.cpus, _int(cpus))
        part.mem_mb = max(part.mem_mb, _int(mem))
        part.gpus = max(part.gpus, gpus_of(gres))
    return partitions


def _int(text: str) -> int:
    found = re.match(r"\d+", text.strip())
    return int(found.group()) if found else 0


def gpus_of(gres: str) -> int:
    """GPUs in a node's generic resources: ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``."""
    total = 0
    for item in re.split(r",(?![^()]*\))", gres):
        parts = re.sub(r"\(.*\)", "", item).split(":")
        if parts[0] == "gpu":
            total += _int(parts[-1]) if len(parts) > 1 else 1
    return total


def minutes(limit: str) -> int | None:
    """A SLURM time limit (``infinite``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``) in whole minutes."""
    limit = limit.strip()
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 3:
        hours, mins, secs = parts
    elif len(parts) == 2:
        hours, mins, secs = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        hours, mins, secs = (parts[0], 0, 0) if days else (0, parts[0], 0)
    return (int(days or 0) * 24 + hours) * 60 + mins + secs // 60
