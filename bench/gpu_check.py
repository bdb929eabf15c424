"""`python -m bench.gpu_check`: the command the project's guide names for whoever has a GPU; the check
itself lives in bench/tools/gpu_check.py. This module stays at the top so that command keeps working."""

import sys

from bench.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
