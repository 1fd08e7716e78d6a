"""The ``kvtier bench report`` command as a script: ``python bench/report.py ...`` (the same code and options)."""

import sys

from kvtier.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
