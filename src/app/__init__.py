"""madminer-sweeper: Hydra-configured sweeps of MadMiner's machine-learning workflow."""

__version__ = "0.1.0"
