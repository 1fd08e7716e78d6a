"""Time to first token with a restored prefix (host, disk) against recompute; prints one JSON record.

A thin script over ``kvtier_connectors.transformers.bench_ttft`` (the same as ``kvtier bench ttft --json``);
every option of that command is accepted, e.g. ``python bench/ttft.py --prompt-tokens 512``.
"""

from __future__ import annotations

import sys

from kvtier_connectors.transformers.bench_ttft import main as bench_main


def main() -> int:
    return bench_main(["--json", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
