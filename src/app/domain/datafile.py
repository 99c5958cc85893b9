"""Find the MadMiner event file for a run and read what the checks need (h5py only, no madminer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError, first_line
from app.toy import simulator

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

        settings = simulator.ToySettings(
            n_events=data_cfg.n_events,
            seed=data_cfg.seed,
            n_parameters=data_cfg.n_parameters,
            smearing=data_cfg.smearing,
            nuisance=bool(data_cfg.get("nuisance", False)),
        )
        try:
            path = simulator.ensure_toy_file(settings, cache_dir, path=data_cfg.path)
        except ValueError as err:
            raise UserError(f"data=toy: {err}") from None
        return inspect(path, is_toy=True)
    return inspect(Path(data_cfg.path).expanduser(), is_toy=False)


def inspect(path: Path, is_toy: bool = False) -> FileInfo:
    """Check that ``path`` is a readable, intact MadMiner event file and read its layout.

    Every way a file can fail to be what it claims (missing, a directory, unreadable, empty, not
    HDF5, cut short, not MadMiner, no benchmarks, no events, non-finite weights) is one UserError.
    """
    import h5py

    if not path.exists():
        raise UserError(
            f"data file not found: {path}; set data.path=/path/to/events.h5 (a MadMiner HDF5 file)"
        )
    if path.is_dir():
        raise UserError(
            f"data.path is a directory, not a file: {path}; point data.path at the MadMiner .h5 event file in it"
        )
    redo = "delete it to regenerate the toy" if is_toy else "copy or write the file again"
    try:
        with open(path, "rb") as f:
            f.read(8)
    except OSError as err:
        raise UserError(
            f"cannot read data file {path} ({err.strerror or err}); make it readable (chmod u+r) or copy it somewhere "
            "you can read"
        ) from None
    if path.stat().st_size == 0:
        raise UserError(f"data file is empty (0 bytes): {path}; {redo} (an interrupted copy or download?)")
    if not h5py.is_hdf5(path):
        raise UserError(
            f"data file is not HDF5 (wrong signature): {path}; data.path must point to a MadMiner .h5 event file"
        )
    try:
        with h5py.File(path, "r") as f:
            return _read_layout(f, path, is_toy)
    except OSError as err:  # h5py reports damage (truncation, bad B-tree, checksum) as OSError
        raise UserError(
            f"data file {path} is damaged or incomplete ({first_line(err)[:200]}); {redo} (an interrupted copy?)"
        ) from None


def _read_layout(f, path: Path, is_toy: bool) -> FileInfo:
    missing = [g for g in REQUIRED_GROUPS if g not in f]
    if missing:
        raise UserError(
            f"{path} is HDF5 but not a MadMiner event file (missing groups: {', '.join(missing)}); "
            "point data.path at a file written by MadMiner (with events)"
        )
    parameters = tuple(_names(f["parameters/names"][()])) if "parameters/names" in f else ()
    benchmarks = tuple(_names(f["benchmarks/names"][()])) if "benchmarks/names" in f else ()
    if not parameters:
        raise UserError(f"{path} defines no parameters (parameters/names); use a MadMiner file after setup")
    if not benchmarks:
        raise UserError(
            f"{path} has no benchmarks (benchmarks/names is empty or missing); use a MadMiner file with "
            "benchmarks (MadMiner.add_benchmark / set_benchmarks before saving)"
        )
    ranges = (
        tuple(tuple(map(float, r)) for r in f["parameters/val_ranges"][()])
        if ("parameters/val_ranges" in f)
        else tuple((-1.0, 1.0) for _ in parameters)
    )
    observables = tuple(_names(f["observables/names"][()])) if "observables/names" in f else ()
    n_events = int(f["samples/observations"].shape[0]) if "samples/observations" in f else 0
    has_morphing = "morphing/morphing_matrix" in f
    if n_events == 0 or "samples/weights" not in f:
        raise UserError(
            f"{path} has no events (samples/observations, samples/weights); use a MadMiner file after event reading"
        )
    _check_finite_events(f, path)
    return FileInfo(path, parameters, ranges, benchmarks, observables, n_events, has_morphing, is_toy)


def _check_finite_events(f, path: Path, chunk: int = 200_000) -> None:
    """NaN or inf in event weights or observations would surface as a crash deep in MadMiner: stop here."""
    import numpy as np

    for name in ("samples/weights", "samples/observations"):
        data = f[name]
        bad = 0
        for start in range(0, data.shape[0], chunk):
            block = data[start : start + chunk]
            bad += int(np.count_nonzero(~np.isfinite(block).reshape(len(block), -1).all(axis=1)))
        if bad:
            raise UserError(
                f"{path}: {bad} of {data.shape[0]} events have NaN or inf in {name}; fix or drop those events "
                "(e.g. with h5py) or regenerate the file"
            )


def _names(raw) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
