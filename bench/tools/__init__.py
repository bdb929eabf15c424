"""Tools that are not part of a run: the GPU check and the speed benchmarks of the harness."""
