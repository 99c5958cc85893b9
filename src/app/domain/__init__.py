"""What the app knows about MadMiner's methods, metrics, data files and valid settings; no heavy imports."""
