"""The machine learning around MadMiner: estimators and their batched evaluation, the fast training loop, the device
choice, and every patch of MadMiner 0.9.6 (madminer_patches, the only module that changes MadMiner)."""
