"""Large training sets in bounded memory: the fast trainer's samples left on disk (:mod:`app.ml.fasttrain`).

Above :data:`STREAM_ABOVE` training samples (or with ``stream=True``), :func:`prepare` opens the sample files with
``np.load(mmap_mode="r")`` instead of loading them, sets up the estimator's input and parameter rescaling from
them as MadMiner does (``initialize_input_transform`` / ``initialize_parameter_transform``), and returns
:class:`Rows`: the files plus how to turn a slice of them into a training batch (the same rescaling, feature
selection and ``_package_training_data`` as the in-memory path, one slice at a time, as float32).

The training loop then reads them

- on the CPU, **in disk order**: each batch is a contiguous slice of the files, the batches of an epoch taken in a
  random order (MadMiner's sampler shuffles the samples before it saves them, so a slice is a random draw); no
  copy of the data set is made, the resident memory is the touched pages of the files plus one batch;
- on CUDA, a chunk at a time into tensors on the device (the GPU holds the float32 data; the host holds a chunk),
  then trains as the in-memory path does.

An in-sample validation split (``validation_split > 0`` without validation files) takes the last rows of the
files (MadMiner draws a random subset); ``shuffle_labels`` and ``limit_samplesize`` keep the in-memory path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from app.ml import estimator_kinds

log = logging.getLogger(__name__)

STREAM_ABOVE = 1 << 21  # training samples (rows of x) above which the fast trainer leaves them on disk
CHUNK = 1 << 18  # rows prepared at once for a scan, the validation loss or a copy to the device


class Rows:
    """Rows ``[start, stop)`` of memory-mapped sample files and how a slice of them becomes a batch."""

    def __init__(
        self, arrays: dict[str, np.ndarray], batch: Callable[[dict], dict], start: int = 0, stop: int | None = None
    ) -> None:
        self.arrays, self.batch = arrays, batch
        self.start = start
        self.stop = len(arrays["x"]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def split(self, n_first: int) -> tuple[Rows, Rows]:
        """The first ``n_first`` rows and the rest."""
        middle = self.start + n_first
        return Rows(self.arrays, self.batch, self.start, middle), Rows(self.arrays, self.batch, middle, self.stop)

    def get(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` (relative to this view), prepared as the in-memory path prepares the whole set."""
        lo, hi = self.start + start, self.start + min(stop, len(self))
        raw = {k: (None if v is None else np.asarray(v[lo:hi])) for k, v in self.arrays.items()}
        return {k: np.array(v, dtype=np.float32) for k, v in self.batch(raw).items()}  # writable, contiguous

    def tensors(self, start: int, stop: int, device) -> dict:
        import torch

        return {k: torch.from_numpy(v).to(device) for k, v in self.get(start, stop).items()}

    def chunks(self, size: int, device) -> Iterator[dict]:
        for start in range(0, len(self), size):
            yield self.tensors(start, start + size, device)

    def has_nan(self) -> bool:
        return any(
            bool(np.isnan(v).any())
            for start in range(0, len(self), CHUNK)
            for v in self.get(start, start + CHUNK).values()
        )

    def to_device(self, device) -> dict:
        """All rows as float32 tensors on ``device``, copied a chunk at a time (the host holds one chunk)."""
        import torch

        first = self.get(0, 1)
        out = {k: torch.empty((len(self),) + v.shape[1:], dtype=torch.float, device=device) for k, v in first.items()}
        for start in range(0, len(self), CHUNK):
            for k, v in self.get(start, start + CHUNK).items():
                out[k][start : start + len(v)].copy_(torch.from_numpy(v))
        return out

    def batches(self, batch_size: int, device) -> Iterator[dict]:
        """One epoch on the CPU: contiguous slices of ``batch_size`` rows, in a random order (torch's generator)."""
        import torch

        n_batches = -(-len(self) // batch_size)
        for i in torch.randperm(n_batches).tolist():
            yield self.tensors(i * batch_size, (i + 1) * batch_size, device)


def n_rows(arrays: dict) -> int | None:
    """Training samples in ``x`` when it is a .npy file name (read from its header), else None."""
    x = arrays.get("x")
    if not isinstance(x, str):
        return None
    return len(np.load(x, mmap_mode="r"))


def wanted(
    stream: bool | None, arrays: dict, inputs: tuple[str, ...], shuffle_labels: bool, limit_samplesize: int | None
) -> bool:
    """Stream when asked (``stream=True``), or by default above STREAM_ABOVE samples given as files."""
    if stream is False:
        return False
    files = all(
        arrays.get(n) is None or isinstance(arrays.get(n), str) for name in inputs for n in (name, f"{name}_val")
    )
    possible = files and not shuffle_labels and limit_samplesize is None
    if stream and not possible:
        log.info("fast trainer: the samples stay in memory (arrays given, shuffle_labels or limit_samplesize)")
    return possible and (bool(stream) or (n_rows(arrays) or 0) > STREAM_ABOVE)


def _open(name: str | None) -> np.ndarray | None:
    if name is None:
        return None
    data = np.load(name, mmap_mode="r")
    return data.reshape(-1, 1) if data.ndim == 1 else data


def prepare(
    estimator, kind, method: str, arrays: dict, scale_inputs: bool, scale_parameters: bool
) -> tuple[Rows, Rows | None]:
    """The memory-mapped counterpart of ``fasttrain._prepare``: (training rows, validation rows or None)."""
    train = {name: _open(arrays.get(name)) for name in kind.inputs}
    kind.check(estimator, method, train)
    x = train["x"]
    n_parameters = (train[kind.thetas[0]] if kind.thetas else train["t_xz"]).shape[1]
    external = all(arrays.get(f"{n}_val") is not None for n in kind.inputs if n in ("x", "y") + kind.thetas)
    if kind.thetas == ():
        external = arrays.get("x_val") is not None and arrays.get("t_xz_val") is not None
    val = {name: _open(arrays.get(f"{name}_val")) for name in kind.inputs} if external else None
    if val is not None:
        assert val["x"].shape[1] == x.shape[1]
        for name in kind.inputs:
            if train[name] is not None and name in kind.thetas + kind.scores + ("r_xz",):
                assert val[name] is not None, f"When providing {name} and sep. validation data, also provide {name}_val"

    estimator.initialize_input_transform(x, transform=scale_inputs, overwrite=False)
    if kind.thetas:
        thetas = [train[n] for n in kind.thetas]
        estimator.initialize_parameter_transform(
            thetas[0] if len(thetas) == 1 else np.concatenate(thetas, 0), scale_parameters
        )
    n_observables = x.shape[1] if estimator.features is None else len(estimator.features)
    estimator_kinds.set_dimensions(estimator, n_observables, n_parameters)

    def batch(raw: dict) -> dict:
        """A slice of the files as fasttrain._prepare turns the whole arrays into training data."""
        if scale_inputs:
            raw["x"] = estimator._transform_inputs(raw["x"])
        if kind.thetas and scale_parameters:
            for name in kind.thetas:
                raw[name] = estimator._transform_parameters(raw[name])
            for name in kind.scores:
                raw[name] = estimator._transform_score(raw[name], inverse=False)
        if estimator.features is not None:
            raw["x"] = raw["x"][:, estimator.features]
        return kind.package(estimator, method, raw)

    log.info("fast trainer: %d training samples read memory-mapped from disk", len(x))
    return Rows(train, batch), (Rows(val, batch) if val is not None else None)


# --------------------------------------------------------------------------- the loop's view of its data
def tensors(data, device):
    """Float tensors on ``device``; samples on disk (:class:`Rows`) stay there on the CPU and are copied a chunk at a
    time to a GPU."""
    import torch

    if isinstance(data, Rows):
        return data if device.type == "cpu" else data.to_device(device)
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float, device=device) for k, v in data.items()}


def size(data) -> int:
    return len(data) if isinstance(data, Rows) else len(data["x"])


def has_nan(data) -> bool:
    import torch

    if isinstance(data, Rows):
        return data.has_nan()
    return any(bool(torch.isnan(t).any()) for t in data.values())


def batches(train, n: int, batch_size: int, device) -> Iterator[dict]:
    """One epoch's batches: slices of a random permutation (``torch.randperm``), or, for samples on disk, slices in
    disk order taken in a random order."""
    import torch

    if isinstance(train, Rows):
        yield from train.batches(batch_size, device)
        return
    order = torch.randperm(n, device=device)
    shuffled = {k: v[order] for k, v in train.items()}
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in shuffled.items()}


def chunks(val, size: int, device) -> Iterator[dict]:
    """The validation set in chunks of ``size`` rows."""
    if isinstance(val, Rows):
        yield from val.chunks(size, device)
        return
    for start in range(0, len(val["x"]), size):
        yield {k: v[start : start + size] for k, v in val.items()}
