"""This project's Hydra sweepers, written against Hydra's public plugin API (``hydra.plugins.sweeper.Sweeper``).

- ``hydra/sweeper=tolerant`` (:mod:`.grid`): the cartesian product of the sweep overrides, in batches; a failed job
  does not end the grid.
- ``hydra/sweeper=tolerant_optuna`` (:mod:`.optuna_sweeper`): an Optuna search (ask -> launch -> tell) with the
  YAML interface of Hydra's Optuna sweeper, a failure budget over all trials, and Ctrl-C that leaves no trial of
  the invocation RUNNING; pruning (``hydra/sweeper/pruner``), trials that never wait for each other
  (``asynchronous``, :mod:`._async`) and workers that share one study's ``n_trials`` (``n_trials_scope=study``).
- ``hydra/launcher=slurm`` (:mod:`.slurm_launcher`): Hydra's submitit SLURM launcher, waiting for each job on its own,
  so that a job SLURM ends (time limit, ``scancel``) is one failed job rather than the end of the sweep.

The sweepers record every job's outcome in ``<sweep dir>/sweep.json`` (:mod:`app.sweeps.outcomes`) and stop launching
once more than ``max_failure_rate`` of the jobs so far failed. Hydra imports every module of this package whose name
does not start with ``_`` when it scans for plugins, for every command of every Hydra app: those modules import only
Hydra, OmegaConf and Hydra's own plugins; Optuna and the search loop (``_search``, ``_space``) are imported when a
search starts, submitit when the SLURM launcher submits.
"""
