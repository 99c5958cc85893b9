"""Estimators, their training loop, the device choice and MadMiner's patches."""
