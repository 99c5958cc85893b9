"""madminer-sweeper: Hydra-configured sweeps of MadMiner's machine-learning workflow."""

import sys

__version__ = "0.1.0"

if sys.version_info >= (3, 12):  # madminer 0.9.6 imports there only with this shim (the GPU machines' Python)
    from app.ml.madminer_patches import python312_shim

    python312_shim()
