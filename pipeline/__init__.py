"""The lab's MNIST VAE as a DVC pipeline tracked in MLflow: the library, with the DVC stages in
`pipeline.stages`. Importing it sets exact mode's environment (`pipeline.exact`) before torch
loads; everything else global is left to the entry points, which call `runtime.start()`."""

from pipeline import exact

exact.apply()
