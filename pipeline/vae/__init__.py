"""The science: the handout's VAE, its training loop, evaluation and pictures; torch only."""
