"""Files on disk: MNIST sources and checksums, IDX, processed splits, weights and checkpoints."""
