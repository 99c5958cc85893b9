"""Sweeps that survive a bad trial, and end by telling what happened.

- :mod:`app.sweeps.outcomes`: each job's outcome (finished / failed / pruned, objective, error line, output dir),
  the failure budget over all jobs so far, kept in ``<sweep dir>/sweep.json`` (written atomically after every
  batch, whatever the launcher);
- :mod:`app.sweeps.report`: the ``hydra.callbacks`` entry that checks the sweeper's options before any job and ends
  the sweep with one short table and one line per failed job (exit code 1);
- :mod:`app.sweeps.storage`: what an Optuna storage needs before Optuna opens it, and whether several workers may
  share it (no sqlite on a network filesystem);
- :mod:`app.sweeps.pruning`: a job's side of ``hydra/sweeper/pruner``: each epoch reported to its trial through the
  study's storage, training stopped (:class:`app.errors.Pruned`) when the pruner says so;
- :mod:`app.sweeps.slurm`: a SLURM launcher's request checked against ``sinfo`` before any job is submitted.

The sweepers themselves are Hydra plugins (``hydra_plugins.madminer_sweeper``): Hydra instantiates sweepers from
that namespace only. Nothing here imports torch, MadMiner, MLflow or Optuna at import time (pruning imports Optuna
when a pruned trial starts).
"""
