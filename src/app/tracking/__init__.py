"""MLflow: the Hydra callback (``callback``), the MLflow calls (``calls``, ``results``) and the helper process that
makes them (``helper``), the store (``backend``), secrets (``redaction``), the sweep's comparison and the model
registry. Stages never import it."""
