"""Atomic writes (a crash never leaves a file or folder that a later stage would trust) and the one file lock."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


@contextmanager
def locked(lock_file: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created if missing; an existing folder is locked as it is, with
    no file added) for the block: one process at a time."""
    lock_file = Path(lock_file)
    if lock_file.is_dir():
        fd = os.open(lock_file, os.O_RDONLY)
    else:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def first_free_slot(folder: str | Path, n: int) -> Iterator[int | None]:
    """Hold the first of ``n`` slots (``folder/slot-<i>.lock``, a non-blocking ``flock`` each) that no other process
    holds, for the block: yields its number, or None when all ``n`` are held. A process that dies frees its slot."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fd = os.open(folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield i
        finally:
            os.close(fd)  # releases the slot
        return
    yield None


def write_json(target: str | Path, data: Any) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return Path(target)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def update_json(target: str | Path, data: dict) -> dict:
    """Merge ``data`` into the JSON object at ``target`` (created if missing), atomically. Two processes may update
    the same file (a job and the MLflow helper, :mod:`app.tracking.helper`, both write its ``run.json``): a lock
    file next to it keeps either update from being lost."""
    target = Path(target)
    with locked(target.with_name(f".{target.name}.lock")):
        merged = read_json(target) if target.exists() else {}
        merged.update(data)
        write_json(target, merged)
    return merged


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (MLflow store or Optuna storage); None for other URIs and for
    ``sqlite:///:memory:``. The one reading of sqlite URIs in the app."""
    if not isinstance(uri, str) or not uri.lower().startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
