"""The ``kvtier bench all`` command as a script: ``python bench/all.py ...`` (the same code and options)."""

import sys

from kvtier.bench.all import main

if __name__ == "__main__":
    sys.exit(main())
