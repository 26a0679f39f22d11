"""Tools beside the pipeline: sweeps (sweep, study), the local team stack behind its login (stack,
postgres, servers), serving a registered model, its request log and load test (serve,
scoring_requests, request_log, loadtest), the drift monitor's operating figures (drift_power),
the training benchmark (bench, bench_step) and the package's import graph (layers)."""
