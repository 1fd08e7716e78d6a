"""Disk-tier benchmark script: same as ``kvtier bench disk`` (run with ``--json`` for one JSON object)."""

import argparse
import sys

from kvtier.bench import disk
from kvtier.config import StoreConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=disk.HELP)
    disk.add_arguments(parser)
    return disk.run(parser.parse_args(), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
