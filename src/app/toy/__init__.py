"""The embedded toy: a MadMiner file generated with MadMiner's API, and its exact likelihood."""
