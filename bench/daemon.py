"""The daemon benchmark as a script: ``python bench/daemon.py [--json] ...`` (same as ``kvtier bench daemon``)."""

import sys

from kvtier.bench.daemon import main

if __name__ == "__main__":
    sys.exit(main())
