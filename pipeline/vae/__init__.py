"""The science: the handout's VAE, its training loop, evaluation, pictures, and the drift monitor's
tests (scipy's) and report."""
