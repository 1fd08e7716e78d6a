"""The ``kvtier bench scaling`` command as a script: ``python bench/scaling.py ...`` (the same code and options)."""

import sys

from kvtier.bench.scaling import main

if __name__ == "__main__":
    sys.exit(main())
