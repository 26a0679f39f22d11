"""MLflow: the store, training runs, the whole VAE as a pyfunc model, the registry, and each
evaluated model's reference profile for the drift monitor."""
