"""The validation loss of a trained estimator, or of an Ensemble's prediction, computed once training is over.

The trainers report each epoch's validation loss of the network they train; an Ensemble's members are trained
one by one, so the mean of their losses is not the loss of the Ensemble, which predicts the mean of its members'
predictions (MadMiner's ``Ensemble``: the mean log r, the mean score, the mean log p). :func:`loss_terms` evaluates
MadMiner's own loss functions (``get_loss``) on that mean prediction, with the inputs standardised by each member's
own transforms as its training did (:func:`prepared`), so that for one estimator it gives the validation loss the
fast trainer reports for the epoch it saved (the mean over validation samples; tests/test_fasttrain.py).
"""

from __future__ import annotations

import numpy as np

from app.ml import estimator_kinds

CHUNK = 1 << 15  # validation samples per forward pass


def prepared(estimator, method: str, arrays: dict, device: str = "cpu") -> dict:
    """The validation arrays (``x``, ``theta``, ``y``, ... as the estimator's ``train()`` takes them, arrays or .npy
    file names, without ``_val``) as the estimator's network takes them: inputs, parameters and scores standardised
    with the estimator's own transforms, its features selected, packaged as its training packages them; tensors on
    ``device``."""
    import torch
    from madminer.utils.various import load_and_check

    kind = estimator_kinds.kinds()[type(estimator)]
    data = {name: load_and_check(arrays.get(name)) for name in kind.inputs}
    data["x"] = estimator._transform_inputs(np.array(data["x"], dtype=np.float64))
    for name in kind.thetas:
        data[name] = estimator._transform_parameters(np.array(data[name], dtype=np.float64))
    for name in kind.scores:
        if data[name] is not None:
            data[name] = estimator._transform_score(np.array(data[name], dtype=np.float64), inverse=False)
    if estimator.features is not None:
        data["x"] = data["x"][:, estimator.features]
    packaged = kind.package(estimator, method, data)
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float, device=device) for k, v in packaged.items()}


def loss_terms(model, method: str, alpha: float, arrays: dict, device: str = "cpu") -> dict[str, float]:
    """``{"val_loss": total, "val_<term>": each unweighted term}`` of ``model``'s prediction on validation arrays.

    ``model`` is an estimator or an Ensemble (then the loss of the mean prediction of its members, formed as
    :data:`app.ml.estimator_kinds.Kind` ``mean`` says). The total is ``first term + alpha * score terms``, as the
    trainers weight it; the terms are MadMiner's labels (``improved_xe``, ``mse_score``, ``nll``, ...).
    """
    import torch
    from madminer import ml
    from madminer.utils.ml.trainer import Trainer
    from madminer.utils.ml.utils import get_loss

    members = list(model.estimators) if isinstance(model, ml.Ensemble) else [model]
    kind = estimator_kinds.kinds()[type(members[0])]
    loss_functions, labels, weights = get_loss(
        method + kind.loss_suffix, None if isinstance(members[0], ml.ScoreEstimator) else alpha
    )
    data = [prepared(m, method, arrays, device) for m in members]
    networks = [m.model.to(torch.device(device), torch.float) for m in members]
    for network in networks:
        network.eval()
    n = len(data[0]["x"])
    sums = 0.0
    for start in range(0, n, CHUNK):
        outputs = [
            kind.outputs(network, {k: v[start : start + CHUNK] for k, v in d.items()}, False)
            for network, d in zip(networks, data)
        ]
        contributions = [f(*kind.mean(outputs)) for f in loss_functions]
        total = Trainer.sum_losses(contributions, weights)
        sums = sums + min(CHUNK, n - start) * torch.stack([total.detach()] + [c.detach() for c in contributions])
    values = (sums / n).tolist()
    return {"val_loss": values[0], **{f"val_{label}": v for label, v in zip(labels, values[1:])}}
