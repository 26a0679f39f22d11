"""Tools beside the pipeline: sweeps (sweep, study), the local team stack behind its login (stack,
postgres, servers), serving a registered model and its load test (serve, scoring_requests,
loadtest), the training benchmark (bench, bench_step) and the package's import graph (layers)."""
