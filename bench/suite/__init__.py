"""Suites: the TOML schema, the grid of runs, the dry run's cost model, executors (inline, worker
pool, submitit/Slurm), the poller that follows runs in other processes, the runner and its live display."""
