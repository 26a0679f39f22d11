"""Tools beside the pipeline: sweeps (sweep, study), the local team stack (stack, postgres,
servers), the training benchmark (bench, bench_step) and the package's import graph (layers)."""
