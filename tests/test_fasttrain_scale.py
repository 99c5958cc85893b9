"""The fast trainer at scale: samples read memory-mapped (app.ml.streaming) and the CUDA-graph step (app.ml.graphs).

A CUDA graph cannot be captured without a GPU: here the graph loop's steps run eagerly (``capture=False``, the code
that is captured on CUDA: the batch gathered by index, the graph-safe optimizer with its learning rate as a tensor,
the eager last batch) and must give the plain loop's losses bit for bit. ``bench/gpu_check.sh`` compares the
captured graph with the plain loop on a GPU.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_fasttrain import AGREEMENT, SETTINGS, samples

from app.ml import fasttrain, graphs, streaming
from app.toy import simulator


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return simulator.generate_toy_file(simulator.ToySettings(n_events=4000), tmp_path_factory.mktemp("scale") / "t.h5")


def _train(data, seed=0, **overrides):
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    estimator = SETTINGS["alices"]["estimator"]()
    losses = fasttrain.fit(estimator, "fast", "cpu", **{**SETTINGS["alices"]["train"], **overrides}, **data)
    return estimator, losses


def _files(data: dict, folder) -> dict:
    for name, array in data.items():
        np.save(folder / f"{name}.npy", array)
    return {name: str(folder / f"{name}.npy") for name in data}


@pytest.mark.parametrize("clip", [None, 1.0])
def test_graph_steps_give_the_plain_loops_losses(toy_path, monkeypatch, clip):
    data = samples(toy_path, "alices", n=1000)
    _, plain = _train(data, clip_gradient=clip)
    monkeypatch.setattr(graphs, "usable", lambda device, optimizer: True)  # the graph loop, uncaptured, on the CPU
    _, graph = _train(data, clip_gradient=clip, compile=True)
    np.testing.assert_array_equal(graph[0], plain[0])
    np.testing.assert_array_equal(graph[1], plain[1])
    # and a different step would show: the same loop without clipping, or with another seed, differs
    _, other = _train(data, seed=1, compile=True, clip_gradient=clip)
    assert not np.array_equal(other[1], plain[1])


def test_compile_without_cuda_is_the_plain_loop(toy_path, caplog):
    data = samples(toy_path, "alices", n=400)
    _, plain = _train(data, n_epochs=2)
    with caplog.at_level(logging.INFO, logger="app.ml.fasttrain"):
        _, compiled = _train(data, n_epochs=2, compile=True)
    np.testing.assert_array_equal(compiled[1], plain[1])
    assert "training.compile: CUDA graphs need CUDA and Adam/AMSGrad; training with the plain loop" in caplog.text


def test_rows_read_memory_mapped_in_disk_order(tmp_path):
    """Every row once per epoch, in contiguous slices of the files, the slices in a random order."""
    import torch

    n = 1003
    files = _files({"x": np.arange(n, dtype=float)[:, None] * [1.0, -1.0]}, tmp_path)
    rows = streaming.Rows({"x": np.load(files["x"], mmap_mode="r")}, lambda raw: raw)
    assert isinstance(rows.arrays["x"], np.memmap)
    torch.manual_seed(0)
    epochs = [[b["x"][:, 0].numpy() for b in rows.batches(100, "cpu")] for _ in range(2)]
    for batches in epochs:
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))
        assert all(np.array_equal(b, np.arange(b[0], b[0] + len(b))) for b in batches)  # contiguous
    firsts = [[int(b[0]) for b in batches] for batches in epochs]
    assert firsts[0] != sorted(firsts[0]) and firsts[0] != firsts[1]  # shuffled, differently per epoch
    head, tail = rows.split(900)
    assert (len(head), len(tail)) == (900, 103) and tail.get(0, 5)["x"][0, 0] == 900


def test_streamed_training_learns_as_the_in_memory_path(toy_path, tmp_path):
    data = samples(toy_path, "alices", n=2000)
    val = samples(toy_path, "alices", n=800, seed=2)
    files = _files({**data, **{f"{k}_val": v for k, v in val.items()}}, tmp_path)
    kwargs = dict(validation_split=None)
    _, (_, in_memory) = _train(files, **kwargs)
    est, (train_streamed, streamed) = _train(files, stream=True, **kwargs)
    _, (_, untrained) = _train(files, stream=True, initial_lr=1e-12, final_lr=1e-12, **kwargs)
    # the same data and rescaling; batches in disk order instead of a fresh permutation: within the agreement
    # between trainers, and far from a network that does not learn
    assert abs(float(np.min(streamed)) - float(np.min(in_memory))) < AGREEMENT["alices"], (streamed, in_memory)
    assert float(np.min(untrained)) - float(np.min(streamed)) > AGREEMENT["alices"], (untrained, streamed)
    assert len(train_streamed) == SETTINGS["alices"]["train"]["n_epochs"]
    # an in-sample split takes the files' last rows: it validates on rows it does not train on, and learns
    _, (_, split) = _train({k: v for k, v in files.items() if not k.endswith("_val")}, stream=True)
    assert float(np.min(untrained)) - float(np.min(split)) > AGREEMENT["alices"] / 2, (untrained, split)
    # the estimator's rescaling is MadMiner's, from the files
    np.testing.assert_allclose(est.x_scaling_means, np.mean(data["x"], axis=0))
    assert streaming.wanted(None, files, ("x",), False, None) is False  # small: in memory unless asked


def test_rows_copied_to_a_device_are_the_in_memory_training_data(toy_path, tmp_path, monkeypatch):
    """What a GPU gets from the files (Rows.to_device, a chunk at a time) is what the in-memory path trains on: on
    CUDA both then train identically (bench/gpu_check.sh compares the losses there)."""
    import torch
    from madminer.ml import ParameterizedRatioEstimator

    from app.ml import estimator_kinds

    monkeypatch.setattr(streaming, "CHUNK", 256)  # three chunks
    data = samples(toy_path, "alices", n=700)
    files = _files(data, tmp_path)
    kind = estimator_kinds.kinds()[ParameterizedRatioEstimator]
    prepared = {}
    for on_disk in (False, True):
        estimator = ParameterizedRatioEstimator(n_hidden=(8,))
        if on_disk:
            rows, _ = streaming.prepare(estimator, kind, "alices", dict(files), True, True)
            prepared[on_disk] = rows.to_device(torch.device("cpu"))
        else:
            arrays, _ = fasttrain._prepare(estimator, kind, "alices", dict(files), True, True, False, None)
            prepared[on_disk] = streaming.tensors(arrays, torch.device("cpu"))
    assert list(prepared[True]) == list(prepared[False]) == ["x", "theta", "y", "r_xz", "t_xz"]
    for name, tensor in prepared[False].items():
        assert torch.equal(prepared[True][name], tensor), name
    assert float(prepared[True]["theta"].std()) == pytest.approx(1.0, abs=0.05)  # rescaled, not the raw thetas


def test_compile_leaves_the_training_key_alone():
    """training.compile takes the plain loop's steps: a model trained either way is reused by the other."""
    from omegaconf import OmegaConf

    from app.store import provenance

    def train_config(**training):
        cfg = {
            "sampling": {"n_samples": 10},
            "evaluation": {"results_dir": None},
            "seed": 1,
            "training": {"estimator": "parameterized", "n_workers": 0, "model_dir": None, **training},
        }
        return provenance.stage_configs(OmegaConf.create(cfg))["train"]

    assert train_config(compile=True) == train_config(compile=False)
    assert train_config(compile=True, batch_size=64) != train_config(compile=True, batch_size=128)
