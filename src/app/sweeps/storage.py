"""What an Optuna storage needs before Optuna opens it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app.store.files import sqlite_path


def prepare_storage(storage: Any) -> None:
    """sqlite needs the folder of its database file (``multirun/`` for the presets) to exist."""
    path = sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "9p", "afs")


def network_filesystem(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the network filesystem that holds ``path`` (from ``/proc/mounts``), or None (local, unknown)."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


def check_shared(sweeper: Any, launcher: Any) -> str | None:
    """One line when several workers would share a sqlite study on a network filesystem (its locks are not safe
    there: trials can be lost or handed out twice); None otherwise."""
    storage = sweeper.get("storage")
    path = sqlite_path(storage) if isinstance(storage, str) else None
    if path is None:
        return None
    in_process = "BasicLauncher" in str((launcher or {}).get("_target_", ""))
    workers = 1 if in_process else int(sweeper.get("n_jobs") or 1)
    if workers <= 1 and sweeper.get("n_trials_scope") != "study":
        return None
    kind = network_filesystem(path.parent if not path.exists() else path)
    if kind is None:
        return None
    return (f"hydra.sweeper.storage={storage} is a sqlite file on a network filesystem ({kind}), which is not safe "
            "for several workers (its file locks do not hold there: trials can be lost or run twice); use a "
            "PostgreSQL storage (postgresql://...) or a sqlite file on a local disk")
