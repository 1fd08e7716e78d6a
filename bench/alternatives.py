"""``kvtier bench alternatives`` as a script: ``python bench/alternatives.py ...`` (the same code and options)."""

import sys

from kvtier.bench.alternatives import main

if __name__ == "__main__":
    sys.exit(main())
