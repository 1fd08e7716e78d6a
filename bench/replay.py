"""Trace replay script: same as ``kvtier bench replay`` (run with ``--json`` for one JSON object).

Example: ``python bench/replay.py --trace mooncake_synthetic_trace.jsonl --host-frac 0.005 --disk-frac 0.01
--json``. Bad input exits with status 2 and a one-line error.
"""

import argparse
import sys

from kvtier.bench import replay
from kvtier.config import StoreConfig
from kvtier.errors import KvtierError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=replay.HELP)
    replay.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return replay.run(args, StoreConfig())
    except KvtierError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
