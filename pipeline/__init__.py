"""The lab's MNIST VAE as a DVC pipeline tracked in MLflow: the library, with the DVC stages in
`pipeline.stages`. Importing it changes nothing global: entry points call `runtime.start()`."""
