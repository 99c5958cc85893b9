"""Evaluation of a trained estimator, below the evaluate stage (which only orchestrates and writes files), kept
apart as MadMiner keeps inference, limits and Fisher information apart: :mod:`.limits` (expected limits),
:mod:`.fisher` (Fisher information), :mod:`.predictions` (the estimator on test events) and :mod:`.truth_metrics`
(how close it is to the exact likelihood of a toy file)."""
