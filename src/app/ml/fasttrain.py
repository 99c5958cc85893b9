"""A fast training loop for MadMiner estimators (``training.trainer=fast``, the default).

MadMiner's Trainer feeds every batch through a per-sample ``Dataset`` and ``DataLoader`` collation,
which dominates the time of the small networks trained here (about 10x on 2 cores). :func:`train`
does the same training with the batches sliced from tensors already on the device (one shuffle
permutation per epoch) and everything else taken from MadMiner unchanged: the estimator's input,
parameter and score transforms, ``_package_training_data``, ``_create_model``, the loss functions
and weights (``get_loss``), the optimizer (``get_optimizer``), the learning-rate schedule and the
per-epoch report (``Trainer.report_epoch``, looked up at call time so that
:func:`app.ml.madminer_patches.epoch_reports` sees every epoch).
It saves nothing: the caller calls ``estimator.save()`` as after MadMiner's own ``train()``, so
``load_estimator``, ``AsymptoticLimits`` and ``Ensemble`` work as before.

Differences from MadMiner 0.9.6 (all deliberate):

- the best state of early stopping is a copy (MadMiner keeps references to the live weights, so its
  "restore" is a no-op and it ends with the last epoch's weights; :func:`fit` gives MadMiner's own trainer,
  when it trains, the same copy: :func:`app.ml.madminer_patches.best_epoch_kept`);
- external validation data get the same parameter rescaling as the training data (MadMiner rescales
  ``x_val`` and ``t_xz_val`` but not ``theta_val``), and early stopping uses them even when
  ``validation_split`` is None;
- the validation loss is the mean over validation samples, evaluated in large chunks (MadMiner: the
  mean over batches of ``batch_size``; equal up to the weight of a short last batch);
- Adam / AMSGrad use torch's fused implementation (the same update in one kernel), and CPU batches up to
  SMALL_BATCH train on one torch thread;
- NaNs are checked once per epoch (one device sync) instead of per batch: an epoch that produced a
  NaN loss ends training and its weights are discarded (MadMiner: the batch before the NaN).
- each epoch's learning rate is rounded to float32 (the precision of the weights it scales), the value a step
  replayed from a CUDA graph reads from its tensor (``training.compile``, :mod:`app.ml.graphs`);
- above ``streaming.STREAM_ABOVE`` samples the sample files are read memory-mapped and, on the CPU, batched in
  disk order (:mod:`app.ml.streaming`).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import numpy as np

from app.ml import device as app_device
from app.ml import estimator_kinds, graphs, madminer_patches, streaming

log = logging.getLogger(__name__)

SMALL_BATCH = 4096  # CPU batches up to this size train on one torch thread (see _threads_for)
VALIDATION_CHUNK = 1 << 15  # samples per forward pass when computing the validation loss
_VERBOSE_EVERY = {"many": 50, "some": 20, "few": 5}  # MadMiner's: log after every 1/N of the epochs


def fit(model, trainer: str = "fast", device: str = "auto", **kwargs):
    """Train an estimator or an ``Ensemble`` with the trainer ``training.trainer`` names (fast | madminer).

    ``kwargs`` are those of the estimator's own ``train()`` (for an Ensemble: of ``train_all()``).
    """
    # MadMiner's own trainer (trainer=madminer, or classes the fast loop does not support) keeps the best epoch
    with madminer_patches.best_epoch_kept():
        return _fit_any(model, trainer, device, **kwargs)


def _fit_any(model, trainer: str, device: str, **kwargs):
    from madminer.ml import Ensemble

    if trainer == "madminer":
        return model.train_all(**kwargs) if isinstance(model, Ensemble) else model.train(**kwargs)
    if not isinstance(model, Ensemble):
        return train(model, device=device, **kwargs)
    n = len(model.estimators)
    for key, value in kwargs.items():  # Ensemble.train_all: a list gives one value per member
        if isinstance(value, list) and len(value) != n:
            raise ValueError(f"Keyword {key} has wrong length {len(value)}")
    return [
        train(member, device=device, **{k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()})
        for i, member in enumerate(model.estimators)
    ]


# --------------------------------------------------------------------------- train()
def train(
    estimator,
    method,
    *,
    device="auto",
    alpha=1.0,
    optimizer="amsgrad",
    n_epochs=50,
    batch_size=128,
    initial_lr=0.001,
    final_lr=0.0001,
    nesterov_momentum=None,
    validation_split=0.25,
    early_stopping=True,
    scale_inputs=True,
    shuffle_labels=False,
    limit_samplesize=None,
    memmap=False,
    verbose="some",
    scale_parameters=True,
    n_workers=8,
    clip_gradient=None,
    early_stopping_patience=None,
    stream=None,
    compile=False,
    **arrays,
):
    """``estimator.train(method, ...)`` with the fast loop; returns ``(losses_train, losses_val)`` like MadMiner.

    Takes the keyword arguments of the estimator's own ``train()`` (arrays or .npy file names for ``x``,
    ``y``, ``theta``, ``r_xz``, ``t_xz``, ``theta0``/``theta1``/``t_xz0``/``t_xz1`` and their ``_val``
    variants) plus ``device``: ``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees it). ``n_workers`` has
    no effect (there is no DataLoader). Estimators of other classes, and ``memmap=True``, go to MadMiner's
    own ``train()``. ``stream``: read the sample files memory-mapped (:mod:`app.ml.streaming`; None = above
    ``streaming.STREAM_ABOVE`` samples). ``compile``: the step as a CUDA graph on CUDA (:mod:`app.ml.graphs`;
    the plain loop elsewhere).
    """
    from madminer import ml

    kind = estimator_kinds.kinds().get(type(estimator))
    if kind is None or memmap:
        reason = "memmap=True" if memmap else f"{type(estimator).__name__} is not supported"
        log.info("fast trainer: %s; training with MadMiner's trainer", reason)
        return estimator.train(
            method=method, alpha=alpha, optimizer=optimizer, n_epochs=n_epochs, batch_size=batch_size,
            initial_lr=initial_lr, final_lr=final_lr, nesterov_momentum=nesterov_momentum,
            validation_split=validation_split, early_stopping=early_stopping, scale_inputs=scale_inputs,
            shuffle_labels=shuffle_labels, limit_samplesize=limit_samplesize, memmap=memmap, verbose=verbose,
            n_workers=n_workers, clip_gradient=clip_gradient, early_stopping_patience=early_stopping_patience,
            **({} if scale_parameters else {"scale_parameters": False}), **arrays,
        )  # fmt: skip
    unknown = set(arrays) - {n for name in kind.inputs for n in (name, f"{name}_val")}
    if unknown:
        raise TypeError(f"{type(estimator).__name__}.train() got unexpected arguments {sorted(unknown)}")
    if isinstance(estimator, (ml.MorphingAwareRatioEstimator, ml.QuadraticMorphingAwareRatioEstimator)):
        if isinstance(estimator, ml.MorphingAwareRatioEstimator) and estimator.morphing_matrix is None:
            raise RuntimeError("Please provide morphing setup during instantiation of a morphing-aware estimator!")
        scale_parameters = False  # as their own train() does

    if streaming.wanted(stream, arrays, kind.inputs, shuffle_labels, limit_samplesize):
        data, data_val = streaming.prepare(estimator, kind, method, arrays, scale_inputs, scale_parameters)
    else:
        data, data_val = _prepare(
            estimator, kind, method, arrays, scale_inputs, scale_parameters, shuffle_labels, limit_samplesize
        )
    if estimator.model is None:
        estimator._create_model()
    from madminer.utils.ml.utils import get_loss, get_optimizer

    loss_functions, loss_labels, loss_weights = get_loss(
        method + kind.loss_suffix, None if isinstance(estimator, ml.ScoreEstimator) else alpha
    )
    opt, opt_kwargs = get_optimizer(optimizer, nesterov_momentum)
    import torch

    device = torch.device(app_device.resolve(device))
    with _threads_for(device, batch_size):
        return _fit(
            estimator.model,
            kind.forward,
            data,
            data_val,
            loss_functions,
            loss_labels,
            loss_weights,
            device=device,
            epochs=n_epochs,
            batch_size=batch_size,
            optimizer=opt,
            optimizer_kwargs=opt_kwargs or {},
            initial_lr=initial_lr,
            final_lr=final_lr,
            validation_split=validation_split,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            clip_gradient=clip_gradient,
            verbose=verbose,
            compile=compile,
        )


@contextmanager
def _threads_for(device, batch_size: int):
    """One torch thread for small CPU batches (restored afterwards).

    The networks trained here are small: below SMALL_BATCH the per-op work is too small for intra-op
    threads, which only add synchronisation, and on a busy machine waiting for a descheduled thread costs
    10x (bench/trainer.py: 42.6k vs 4.5k samples/s at batch 1024 on the shared 2-core sandbox).
    """
    import torch

    if device.type != "cpu" or batch_size > SMALL_BATCH:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _prepare(estimator, kind, method, arrays, scale_inputs, scale_parameters, shuffle_labels, limit_samplesize):
    """The estimator's own preprocessing (MadMiner's train() up to the Trainer): (data, data_val or None)."""
    from madminer.utils.various import load_and_check, restrict_samplesize, shuffle

    train = {name: load_and_check(arrays.get(name)) for name in kind.inputs}
    kind.check(estimator, method, train)
    x = train["x"]
    n_observables = x.shape[1]
    n_parameters = (train[kind.thetas[0]] if kind.thetas else train["t_xz"]).shape[1]
    if limit_samplesize is not None and limit_samplesize < len(x):
        train = dict(zip(train, restrict_samplesize(limit_samplesize, *train.values())))

    external = all(arrays.get(f"{n}_val") is not None for n in kind.inputs if n in ("x", "y") + kind.thetas)
    if kind.thetas == ():  # score estimators: x_val and t_xz_val
        external = arrays.get("x_val") is not None and arrays.get("t_xz_val") is not None
    val = {name: load_and_check(arrays.get(f"{name}_val")) for name in kind.inputs} if external else None
    if val is not None:
        assert val["x"].shape[1] == n_observables
        for name in kind.inputs:
            if train[name] is not None and name in kind.thetas + kind.scores + ("r_xz",):
                assert val[name] is not None, f"When providing {name} and sep. validation data, also provide {name}_val"

    sets = [train] + ([val] if val is not None else [])
    if scale_inputs:
        estimator.initialize_input_transform(x, overwrite=False)
        for d in sets:
            d["x"] = estimator._transform_inputs(d["x"])
    else:
        estimator.initialize_input_transform(x, False, overwrite=False)
    if kind.thetas:
        all_thetas = np.concatenate([train[n] for n in kind.thetas], 0)
        estimator.initialize_parameter_transform(all_thetas, scale_parameters)
        if scale_parameters:
            for d in sets:
                for name in kind.thetas:
                    d[name] = estimator._transform_parameters(d[name])
                for name in kind.scores:
                    d[name] = estimator._transform_score(d[name], inverse=False)
    if shuffle_labels:
        labels = [n for n in kind.inputs if n not in ("x",) + kind.thetas]
        for name, value in zip(labels, shuffle(*[train[n] for n in labels])):
            train[name] = value
    if estimator.features is not None:
        for d in sets:
            d["x"] = d["x"][:, estimator.features]
        n_observables = train["x"].shape[1]

    estimator_kinds.set_dimensions(estimator, n_observables, n_parameters)
    data = kind.package(estimator, method, train)
    return data, (kind.package(estimator, method, val) if val is not None else None)


# --------------------------------------------------------------------------- the loop
def _fit(
    model,
    forward,
    data,
    data_val,
    loss_functions,
    loss_labels,
    loss_weights,
    *,
    device,
    epochs,
    batch_size,
    optimizer,
    optimizer_kwargs,
    initial_lr,
    final_lr,
    validation_split,
    early_stopping,
    early_stopping_patience,
    clip_gradient,
    verbose,
    compile=False,
):
    import torch
    from madminer.utils.ml import trainer as mm_trainer

    Trainer = mm_trainer.Trainer
    model = model.to(device, torch.float)
    train = streaming.tensors(data, device)
    n = streaming.size(train)
    if data_val is not None:
        val = streaming.tensors(data_val, device)
    elif validation_split is not None and validation_split > 0.0:
        assert 0.0 < validation_split < 1.0, f"Wrong validation split: {validation_split}"
        split = int(np.floor(validation_split * n))
        if isinstance(train, streaming.Rows):  # on disk: the last rows (the files are in shuffled order)
            train, val = train.split(n - split)
        else:
            indices = np.random.permutation(n)  # MadMiner's split: the same draw from numpy's global generator
            val_idx = torch.as_tensor(indices[:split], device=device)
            train_idx = torch.as_tensor(indices[split:], device=device)
            val = {k: v[val_idx] for k, v in train.items()}
            train = {k: v[train_idx] for k, v in train.items()}
        n = streaming.size(train)
    else:
        val = None
    if val is not None and streaming.size(val) == 0:
        log.warning("fast trainer: the validation set is empty; training without validation")
        val = None
    for label, tensors in (("Training data", train), ("Validation data", val or {})):
        if streaming.has_nan(tensors):
            log.warning("%s contains NaNs, aborting training!", label)
            return np.array([]), np.array([])

    steps = None
    if compile and isinstance(train, dict) and graphs.usable(device, optimizer):
        opt = graphs.make_optimizer(optimizer, model, initial_lr, optimizer_kwargs, device)
        steps = graphs.GraphSteps(
            model, forward, loss_functions, loss_weights, opt, clip_gradient, batch_size, capture=device.type == "cuda"
        )
    else:
        if compile:
            log.info("training.compile: CUDA graphs need CUDA and Adam/AMSGrad; training with the plain loop")
        opt = _optimizer(optimizer, model, initial_lr, optimizer_kwargs)
    params = list(model.parameters())
    early_stopping = early_stopping and val is not None and epochs > 1
    if verbose not in ("all", "none", *_VERBOSE_EVERY):
        raise ValueError(f"Unknown value {verbose} for keyword verbose")
    every = {"all": 1, "none": epochs + 2}.get(verbose) or max(int(round(epochs / _VERBOSE_EVERY[verbose])), 1)
    n_batches = math.ceil(n / batch_size)
    best_loss, best_state, best_epoch = None, None, None
    losses_train, losses_val = [], []
    loss_val = None
    for i_epoch in range(epochs):
        # rounded to float32, as a step replayed from a CUDA graph reads it (app.ml.graphs): the same step either way
        lr = float(np.float32(Trainer.calculate_lr(i_epoch, epochs, initial_lr, final_lr)))
        if steps is not None:
            steps.set_lr(lr)
        else:
            Trainer.set_lr(opt, lr)
        before = _copy_state(model)
        model.train()
        totals = []
        diverged = False
        if steps is not None:
            totals, diverged = steps.epoch(train, n)
        for batch in () if steps is not None else streaming.batches(train, n, batch_size, device):
            try:
                contributions = forward(model, batch, loss_functions, True)
            except RuntimeError as err:  # BCELoss refuses NaN outputs (MadMiner checks them before its losses)
                if "between 0 and 1" not in str(err):
                    raise
                diverged = True
                break
            loss = Trainer.sum_losses(contributions, loss_weights)
            for p in params:  # opt.zero_grad(set_to_none=True) without its per-call overhead
                p.grad = None
            loss.backward()
            if clip_gradient is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_gradient)
            opt.step()
            totals.append(torch.stack([loss.detach()] + [c.detach() for c in contributions]))
        if diverged:
            log.info("Ending training during epoch %s because NaNs appeared", i_epoch + 1)
            model.load_state_dict(before)
            loss_val = None
            break
        means = (torch.stack(totals).sum(0) / n_batches).tolist()  # the one sync of the epoch
        loss_val, contributions_val = None, None
        if val is not None and not math.isnan(means[0]):
            try:
                val_means = _validation_loss(model, forward, val, loss_functions, loss_weights)
            except RuntimeError as err:  # the last step made the network output NaN: BCELoss refuses it
                if "between 0 and 1" not in str(err):
                    raise
                val_means = [math.nan] * (1 + len(loss_functions))
            loss_val, contributions_val = val_means[0], np.array(val_means[1:])
        if math.isnan(means[0]) or (loss_val is not None and math.isnan(loss_val)):
            log.info("Ending training during epoch %s because NaNs appeared", i_epoch + 1)
            model.load_state_dict(before)
            loss_val = None
            break
        loss_train, contributions_train = means[0], np.array(means[1:])
        losses_train.append(loss_train)
        losses_val.append(loss_val)
        if early_stopping:
            if best_loss is None or loss_val < best_loss:
                best_loss, best_state, best_epoch = loss_val, _copy_state(model), i_epoch
            stop = early_stopping_patience is not None and i_epoch - best_epoch > early_stopping_patience >= 0
            if stop or not np.isfinite(loss_val):
                log.info("Early stopping: ending training after %s epochs", i_epoch + 1)
                break
        # looked up now, on the class: madminer_patches.epoch_reports hooks this staticmethod
        mm_trainer.Trainer.report_epoch(
            i_epoch,
            loss_labels,
            loss_train,
            loss_val,
            contributions_train,
            contributions_val,
            verbose=(i_epoch + 1) % every == 0,
        )
    if early_stopping and best_state is not None:
        if not np.isfinite(best_loss):
            log.warning("Best loss is None, cannot wrap up early stopping")
        elif loss_val is None or not np.isfinite(loss_val) or best_loss < loss_val:
            log.info("Early stopping after epoch %s, with loss %8.5f compared to final loss %s", best_epoch + 1,
                     best_loss, loss_val)  # fmt: skip
            model.load_state_dict(best_state)
    return np.array(losses_train), np.array(losses_val)


def _optimizer(optimizer, model, lr, kwargs):
    """MadMiner's optimizer; Adam (and AMSGrad) with torch's fused kernel (same algorithm, ~25 % faster on CPU)."""
    import torch

    if optimizer is torch.optim.Adam and "fused" not in kwargs:
        try:
            return optimizer(model.parameters(), lr=lr, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
            pass
    return optimizer(model.parameters(), lr=lr, **kwargs)


def _copy_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _validation_loss(model, forward, val, loss_functions, loss_weights) -> list[float]:
    """[total, *unweighted terms]: means over all validation samples, in chunks of VALIDATION_CHUNK."""
    import torch
    from madminer.utils.ml.trainer import Trainer

    model.eval()
    n = streaming.size(val)
    sums = 0.0
    for chunk in streaming.chunks(val, VALIDATION_CHUNK, next(model.parameters()).device):
        contributions = forward(model, chunk, loss_functions, False)
        loss = Trainer.sum_losses(contributions, loss_weights)
        sums = sums + len(chunk["x"]) * torch.stack([loss.detach()] + [c.detach() for c in contributions])
    return (sums / n).tolist()
