"""Gather/scatter benchmark script: same as ``kvtier bench gather`` (run with ``--json`` for one JSON object)."""

import sys

from kvtier.bench.gather import main

if __name__ == "__main__":
    sys.exit(main())
