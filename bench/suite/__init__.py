"""Suites: the TOML schema, the grid of runs, the dry run's cost model, executors (inline, worker
pool, submitit/Slurm), the runner and its live display."""
