"""MLflow: the store, training runs, the whole VAE as a pyfunc model, and the registry."""
