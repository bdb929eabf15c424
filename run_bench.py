#!/usr/bin/env python
"""diffbench: `python run_bench.py --help`. With no arguments: the mini suite, then its report."""

import sys

from bench.core.perf import tune_allocator

tune_allocator()  # before torch allocates anything

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
