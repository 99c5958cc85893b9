"""Find the MadMiner event file for a run and read what the checks need (h5py only, no madminer)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError

REQUIRED_GROUPS = ("parameters", "benchmarks", "observables", "samples")


@dataclass(frozen=True)
class FileInfo:
    path: Path
    parameters: tuple[str, ...]
    parameter_ranges: tuple[tuple[float, float], ...]
    benchmarks: tuple[str, ...]
    observables: tuple[str, ...]
    n_events: int
    has_morphing: bool
    is_toy: bool

    @property
    def n_parameters(self) -> int:
        return len(self.parameters)


def resolve(data_cfg, cache_dir: str | Path) -> FileInfo:
    """Return the checked event file: the (cached) toy for ``data=toy``, ``data.path`` for ``data=file``."""
    if data_cfg.kind == "toy":
        from app import toy

        settings = toy.ToySettings(
            n_events=data_cfg.n_events,
            seed=data_cfg.seed,
            n_parameters=data_cfg.n_parameters,
            smearing=data_cfg.smearing,
        )
        try:
            path = toy.ensure_toy_file(settings, cache_dir, path=data_cfg.path)
        except ValueError as err:
            raise UserError(f"data=toy: {err}") from None
        return inspect(path, is_toy=True)
    return inspect(Path(data_cfg.path).expanduser(), is_toy=False)


def inspect(path: Path, is_toy: bool = False) -> FileInfo:
    import h5py

    if not path.exists():
        raise UserError(
            f"data file not found: {path}; set data.path=/path/to/events.h5 (a MadMiner HDF5 file)"
        )
    if path.is_dir() or not h5py.is_hdf5(path):
        raise UserError(f"data file is not HDF5: {path}; data.path must point to a MadMiner .h5 event file")
    with h5py.File(path, "r") as f:
        missing = [g for g in REQUIRED_GROUPS if g not in f]
        if missing:
            raise UserError(
                f"{path} is HDF5 but not a MadMiner event file (missing groups: {', '.join(missing)}); "
                "point data.path at a file written by MadMiner (with events)"
            )
        parameters = tuple(_names(f["parameters/names"][()]))
        ranges = (
            tuple(tuple(map(float, r)) for r in f["parameters/val_ranges"][()])
            if ("parameters/val_ranges" in f)
            else tuple((-1.0, 1.0) for _ in parameters)
        )
        benchmarks = tuple(_names(f["benchmarks/names"][()]))
        observables = tuple(_names(f["observables/names"][()]))
        n_events = int(f["samples/observations"].shape[0]) if "samples/observations" in f else 0
        has_morphing = "morphing/morphing_matrix" in f
    if n_events == 0:
        raise UserError(
            f"{path} has no events (samples/observations); use a MadMiner file after event reading"
        )
    return FileInfo(path, parameters, ranges, benchmarks, observables, n_events, has_morphing, is_toy)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _names(raw) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
