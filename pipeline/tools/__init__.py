"""Tools beside the pipeline: the local team stack and the training benchmark."""
