"""Files on disk: atomic writes, the stage cache and the provenance of every stage output."""
