"""MLflow: the Hydra callback, the store, the sweep's comparison and the model registry. Stages never import it."""
