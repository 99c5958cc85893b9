"""A content-addressed cache of stage outputs, with a verified manifest and provenance per entry.

Layout under the cache root (``paths.cache_dir``)::

    stages/<stage>/<key>/     one entry: the stage's files + .manifest.json (file list, sizes, sha256, provenance)
    tmp/<stage>.<key>.XXXX/   a build in progress; renamed into stages/ when complete
    locks/<stage>.<key>.lock  per-key file locks (fcntl.flock), and digests.lock
    digests.json              memoised sha256 of data files, keyed by (resolved path, size, mtime_ns)
    toy/                      the generated toy event files (app.toy.simulator), not stage outputs

An entry is immutable once renamed into place and is served only while its manifest matches the files
on disk; a damaged one is removed (with one warning) and rebuilt. A build that raises or is killed
leaves at most a folder under ``tmp/``, which is never served and is removed by the next build of the
same key or :meth:`StageCache.clear`.

Standard library only (and :mod:`app.store.files`), so ``import app.store.cache`` stays cheap.
``python -m app.store info|clear`` shows or empties a cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.store.files import locked, write_json

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
FORMAT = 1
ENV_VAR = "MADMINER_SWEEPER_CACHE"
DEFAULT_DIR = ".cache/madminer-sweeper"
# Packages whose version changes a stage's numbers (torch: training and the batched evaluation; NumPy and SciPy: the
# sampling, the limits and the Fisher information), read from their metadata without importing them.
PACKAGES = ("madminer-sweeper", "madminer", "torch", "numpy", "scipy")
# What clear() removes: only names this project writes, never anything else a user put in the folder.
OWNED = ("stages", "tmp", "locks", "digests.json", "toy")

_NAME = re.compile(r"[A-Za-z0-9_-]+")


def default_dir() -> Path:
    """``$MADMINER_SWEEPER_CACHE`` or ``.cache/madminer-sweeper`` (the same default as ``paths.cache_dir``)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


# --------------------------------------------------------------------------- keys
def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal inputs give equal text whatever the mapping order."""
    return json.dumps(json_values(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_values(value: Any) -> Any:
    """``value`` as JSON types (dicts with str keys, lists, numbers, str, None); TypeError for anything else."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_values(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes):  # lists, tuples, OmegaConf ListConfig
        return [json_values(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return json_values(value.tolist())
    raise TypeError(f"cannot hash a {type(value).__name__} into a cache key: pass plain, resolved values")


@functools.cache
def versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (package metadata, no imports), and a digest of this package's source:
    an editable install whose code changed without a version bump must not reuse old outputs."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["code"] = code_digest()
    return found


def code_digest() -> str:
    """sha256 over the project's Python sources (src/app), in a fixed order."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stage_key(stage: str, *, data_digest: str, config: Mapping, upstream: str | None) -> str:
    """sha256 hex over the stage name, the data file's digest, the config subtree the stage reads
    (resolved, plain values), the upstream stage's key and the package versions."""
    payload = {
        "format": FORMAT,
        "stage": stage,
        "data": data_digest,
        "config": config,
        "upstream": upstream,
        "versions": versions(),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# --------------------------------------------------------------------------- data file digests
def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digest(path, cache_root) -> str:
    """sha256 hex of a data file, memoised in ``<cache_root>/digests.json``.

    The memo is keyed by the resolved path, size and ``mtime_ns``: a file is hashed once, not once per
    job, and again when it changes. Concurrent processes serialise on a lock, so the second waits for
    the first one's result instead of hashing the file again.
    """
    path = Path(path).expanduser().resolve()
    root = Path(cache_root).expanduser()
    memo_file = root / "digests.json"
    name = str(path)
    with locked(root / "locks" / "digests.lock"):
        memo = _read_memo(memo_file)
        before = path.stat()
        hit = memo.get(name)
        if hit and hit.get("size") == before.st_size and hit.get("mtime_ns") == before.st_mtime_ns:
            return hit["sha256"]
        digest = _sha256_file(path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return digest  # changed while it was read: do not memoise a digest of a moving target
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted files
        memo[name] = {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": digest}
        write_json(memo_file, memo)
        return digest


def _read_memo(memo_file: Path) -> dict:
    try:
        memo = json.loads(memo_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("cache: unreadable %s, starting it afresh", memo_file)
        return {}
    return memo if isinstance(memo, dict) else {}


# --------------------------------------------------------------------------- manifests
def _files(folder: Path) -> list[tuple[str, Path]]:
    """(posix relative name, path) of every file below ``folder``, the manifest excluded, sorted."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            full = Path(parent) / name
            rel = full.relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append((rel, full))
    return sorted(found)


def write_manifest(folder, meta: dict) -> None:
    """Write ``<folder>/.manifest.json``: every file's relative name, size and sha256, and the provenance
    (``meta`` plus ``created`` and ``versions`` unless ``meta`` sets them)."""
    folder = Path(folder)
    files = {rel: {"size": path.stat().st_size, "sha256": _sha256_file(path)} for rel, path in _files(folder)}
    provenance = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
    provenance.update(json_values(dict(meta)))
    write_json(folder / MANIFEST, {"format": FORMAT, "files": files, "provenance": provenance})


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify(folder) -> str | None:
    """None if ``folder``'s files match its manifest (names, sizes, sha256), else a one-line description."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST} in {folder}"
    manifest = _read_manifest(folder)
    if manifest is None:
        return f"unreadable {MANIFEST} in {folder}"
    expected = manifest["files"]
    present = dict(_files(folder))
    missing = sorted(set(expected) - set(present))
    if missing:
        return f"file missing: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(present) - set(expected))
    if extra:
        return f"unexpected file: {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for rel, want in sorted(expected.items()):
        size = present[rel].stat().st_size
        if size != want.get("size"):
            return f"file changed: {rel} ({size} bytes, manifest says {want.get('size')})"
        if _sha256_file(present[rel]) != want.get("sha256"):
            return f"file changed: {rel} (sha256 differs from the manifest)"
    return None


def read_provenance(folder) -> dict | None:
    """The provenance stored by :func:`write_manifest` / :meth:`StageCache.get_or_create`, or None."""
    manifest = _read_manifest(Path(folder))
    if manifest is None or not isinstance(manifest.get("provenance"), dict):
        return None
    return manifest["provenance"]


# --------------------------------------------------------------------------- the cache
@dataclass
class Entry:
    stage: str
    key: str
    path: Path  # folder holding the stage's files
    meta: dict  # provenance: what was passed as meta + key, stage, created time, versions


class StageCache:
    """Stage outputs under ``<root>/stages/<stage>/<key>/``, verified on every hit.

    With ``enabled=False`` :meth:`get_or_create` raises ``RuntimeError`` (the caller runs the stage into its own
    output folder instead).
    """

    def __init__(self, root, enabled: bool = True):
        self.root = Path(root).expanduser()
        self.enabled = enabled

    def entry_path(self, stage: str, key: str) -> Path:
        _check_name("stage", stage)
        _check_name("key", key)
        return self.root / "stages" / stage / key

    def _lock_path(self, stage: str, key: str) -> Path:
        return self.root / "locks" / f"{stage}.{key}.lock"

    # ---- reading
    def _lookup(self, stage: str, key: str) -> Entry | None | bool:
        """The entry if valid, None if absent, False if damaged."""
        path = self.entry_path(stage, key)
        if not path.exists():
            return None
        if verify(path) is not None:
            return False
        return Entry(stage, key, path, read_provenance(path) or {})

    def _discard(self, stage: str, key: str) -> None:
        path = self.entry_path(stage, key)
        problem = verify(path)
        log.warning("cache: discarding damaged %s entry %s (%s); it will be rebuilt", stage, key[:12], problem)
        trash = Path(tempfile.mkdtemp(prefix=f"{stage}.{key}.damaged-", dir=self._tmp_dir()))
        os.replace(path, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    # ---- writing
    def get_or_create(self, stage: str, key: str, build: Callable[[Path], None], meta: dict) -> tuple[Entry, bool]:
        """Return ``(entry, reused)``.

        A valid entry is reused. Otherwise, under an exclusive per-key lock, ``build(tmp_dir)`` writes the
        stage's files into a fresh folder under ``<root>/tmp``; the manifest and provenance (``meta`` +
        key, stage, created, versions) are added and the folder is renamed into place. If ``build``
        raises, the folder is removed and the exception propagates; concurrent callers with the same key
        wait for the one building and then reuse its entry.
        """
        if not self.enabled:
            raise RuntimeError("StageCache(enabled=False).get_or_create: the cache is off, run the stage directly")
        target = self.entry_path(stage, key)
        entry = self._lookup(stage, key)  # immutable once in place: a valid one needs no lock
        if entry:
            return entry, True
        with locked(self._lock_path(stage, key)):
            entry = self._lookup(stage, key)
            if entry:
                return entry, True
            if entry is False:
                self._discard(stage, key)
            self._remove_temps(stage, key)  # left by a killed build of this key: we hold its lock
            tmp = Path(tempfile.mkdtemp(prefix=f"{stage}.{key}.", dir=self._tmp_dir()))
            try:
                build(tmp)
                write_manifest(tmp, {**meta, "stage": stage, "key": key})
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.debug("cache: stored %s entry %s", stage, key[:12])
        return Entry(stage, key, target, read_provenance(target) or {}), False

    def _tmp_dir(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def _remove_temps(self, stage: str, key: str) -> None:
        tmp = self.root / "tmp"
        if tmp.is_dir():
            for path in tmp.glob(f"{stage}.{key}.*"):
                shutil.rmtree(path, ignore_errors=True)

    # ---- housekeeping
    def entries(self) -> dict[str, int]:
        """Number of entries per stage (not verified)."""
        stages = self.root / "stages"
        if not stages.is_dir():
            return {}
        return {d.name: sum(1 for e in d.iterdir() if e.is_dir()) for d in sorted(stages.iterdir()) if d.is_dir()}

    def size(self) -> int:
        """Bytes used by everything under the root."""
        return _tree_size(self.root)

    def clear(self) -> int:
        """Remove the entries, temporary folders, locks, digests and toy files; return the bytes freed.

        Only names this project writes are removed (anything else in the folder stays). Do not run it
        while jobs use the cache.
        """
        before = self.size()
        for name in OWNED:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
        return before - self.size()


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"cache {what} must be letters, digits, '_' or '-', got {value!r}")


def _tree_size(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for parent, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total


# --------------------------------------------------------------------------- command line
def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    """``python -m app.store info|clear [--dir DIR]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m app.store", description="Show or empty the madminer-sweeper stage cache."
    )
    parser.add_argument("command", choices=("info", "clear"), help="info: location, entries, size; clear: empty it")
    parser.add_argument("--dir", type=Path, default=None, help=f"cache folder (default: ${ENV_VAR} or {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    root = (args.dir or default_dir()).expanduser()
    if root.exists() and not root.is_dir():
        print(f"error: cache dir {root} is a file; pass --dir pointing to a folder", file=sys.stderr)
        return 2
    cache = StageCache(root)
    if args.command == "clear":
        freed = cache.clear()
        print(f"cleared {root.resolve()}: freed {_human(freed)}")
        return 0
    print(f"cache: {root.resolve()}" + ("" if root.exists() else " (does not exist yet)"))
    for stage, count in cache.entries().items():
        print(f"  {stage}: {count} entries, {_human(_tree_size(root / 'stages' / stage))}")
    toys = sorted((root / "toy").glob("*.h5")) if (root / "toy").is_dir() else []
    if toys:
        print(f"  toy files: {len(toys)}, {_human(sum(p.stat().st_size for p in toys))}")
    temps = sorted((root / "tmp").iterdir()) if (root / "tmp").is_dir() else []
    if temps:
        print(f"  temporary folders (builds running or interrupted): {len(temps)}")
    print(f"total: {_human(cache.size())}")
    return 0

