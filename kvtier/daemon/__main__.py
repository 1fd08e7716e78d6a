"""``python -m kvtier.daemon ...``: the ``kvtier`` command (``serve``, ``stats``, ...), for tests and for
machines without the ``kvtier`` entry point on their PATH."""

import sys

from kvtier.cli import main

if __name__ == "__main__":
    sys.exit(main())
