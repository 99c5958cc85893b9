"""``training.compile=true``: the fast trainer's step as one CUDA graph (:mod:`app.ml.fasttrain`).

On a GPU the plain loop is bound by kernel launches (about 3 ms a step at any batch on an H200: the forward pass,
the score's double backward, the loss and the optimizer are a few hundred small kernels). :class:`GraphSteps`
records one training step (gather the batch, forward, loss, backward, gradient clipping, the optimizer's update)
once as a CUDA graph and replays it: a step is then one graph launch plus two small copies (one graph for the
full batches, one for the epoch's last, shorter batch).

It trains exactly as the plain loop does: the same permutation per epoch (``torch.randperm``), the same batches
(``index_select`` of the shuffled indices instead of slicing a shuffled copy: the same rows), the same
forward/backward/update. What differs is only how the work is launched, and the optimizer: Adam/AMSGrad with
``capturable=True`` and the learning rate as a tensor on the device (the graph reads it; MadMiner's per-epoch
schedule is written into it), fused as in the plain loop. The first :data:`WARMUP` steps run eagerly on a side
stream (the optimizer's state must exist before the capture).

``torch.compile`` is no alternative here: AOTAutograd does not support the double backward of the score
estimators (``torch.compile with aot_autograd does not currently support double backward``, torch 2.13).

Only on CUDA (:func:`usable`) and for Adam/AMSGrad; elsewhere, and when the capture fails (a host
synchronisation inside the step, an unsupported kernel), training continues with the plain loop, with one log
line saying why. Dropout's random numbers are drawn differently in a replayed graph (CUDA's graph-safe
generator): with ``training.dropout_prob > 0`` the losses match the plain loop in distribution, not exactly.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

WARMUP = 3  # steps run eagerly (on a side stream) before the first capture


def usable(device, optimizer) -> bool:
    """CUDA graphs for this device and MadMiner optimizer class (Adam / AMSGrad only)."""
    import torch

    return device.type == "cuda" and optimizer is torch.optim.Adam


def make_optimizer(optimizer, model, lr: float, kwargs: dict, device):
    """MadMiner's Adam / AMSGrad, graph-safe: ``capturable=True``, fused, the learning rate a tensor on the device."""
    import torch

    lr_tensor = torch.tensor(lr, dtype=torch.float, device=device)
    try:
        return optimizer(model.parameters(), lr=lr_tensor, capturable=True, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return optimizer(model.parameters(), lr=lr_tensor, capturable=True, **kwargs)


class GraphSteps:
    """One epoch's steps, replayed from a CUDA graph (``capture=False``: the same steps run eagerly, for tests)."""

    def __init__(
        self, model, forward, loss_functions, loss_weights, opt, clip_gradient, batch_size: int, capture: bool
    ) -> None:
        self.model, self.forward, self.loss_functions, self.loss_weights = model, forward, loss_functions, loss_weights
        self.opt, self.clip_gradient, self.batch_size, self.capture = opt, clip_gradient, batch_size, capture
        self.params = list(model.parameters())
        self.graphs: dict[int, tuple] = {}  # rows of a batch -> (graph, its static indices, its [loss, *terms])
        self.failed = False  # a capture failed: the plain loop's steps from then on
        self.done = 0  # steps run so far (the first WARMUP eagerly)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)

    def epoch(self, train: dict, n: int) -> tuple[list, bool]:
        """Train one epoch on the tensors ``train`` (n rows): (per-step [loss, *terms] tensors, diverged)."""
        import torch

        order = torch.randperm(n, device=train["x"].device)
        totals = []
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if not self.capture:
                step = self._eager(train, idx)
            elif self.done < WARMUP or self.failed:
                step = self._side_stream(train, idx)
            else:
                step = self._replay(train, idx)
            if step is None:
                return totals, True
            totals.append(step)
            self.done += 1
        return totals, False

    def _step(self, train: dict, idx):
        """Forward, loss, backward, clipping and update on the rows ``idx``: the step's [loss, *terms]."""
        import torch
        from madminer.utils.ml.trainer import Trainer

        batch = {k: v.index_select(0, idx) for k, v in train.items()}
        contributions = self.forward(self.model, batch, self.loss_functions, True)
        loss = Trainer.sum_losses(contributions, self.loss_weights)
        for p in self.params:
            p.grad = None
        loss.backward()
        if self.clip_gradient is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_gradient)
        self.opt.step()
        return torch.stack([loss.detach()] + [c.detach() for c in contributions])

    def _eager(self, train: dict, idx):
        try:
            return self._step(train, idx)
        except RuntimeError as err:  # BCELoss refuses NaN outputs, as in the plain loop
            if "between 0 and 1" not in str(err):
                raise
            return None

    def _side_stream(self, train: dict, idx):
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self._eager(train, idx)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _replay(self, train: dict, idx):
        """The step on ``idx`` from the graph for its batch size (captured at its first use: the full batches' and
        the epoch's last, shorter one's)."""
        found = self.graphs.get(len(idx)) or self._capture(train, idx)
        if found is None:
            return self._side_stream(train, idx)
        graph, static_idx, out = found
        static_idx.copy_(idx)
        graph.replay()
        return out.clone()

    def _capture(self, train: dict, idx):
        import torch

        static_idx = idx.clone()
        graph = torch.cuda.CUDAGraph()
        for p in self.params:
            p.grad = None
        try:
            with torch.cuda.graph(graph):  # its own memory pool: nothing of one graph's replay lives in another's
                out = self._step(train, static_idx)
        except Exception as err:  # noqa: BLE001 - whatever made the capture fail, the plain loop goes on
            log.warning(
                "training.compile: the CUDA graph capture failed (%s); training with the plain loop",
                str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
            )
            self.failed = True
            return None
        self.graphs[len(idx)] = (graph, static_idx, out)
        log.info("training.compile: the training step at batch %d runs as one CUDA graph", len(idx))
        return self.graphs[len(idx)]
