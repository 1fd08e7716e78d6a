"""Host-tier benchmark script: same as ``kvtier bench host`` (run with ``--json`` for one JSON object)."""

import argparse
import sys

from kvtier.bench import host
from kvtier.config import StoreConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=host.HELP)
    host.add_arguments(parser)
    return host.run(parser.parse_args(), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
