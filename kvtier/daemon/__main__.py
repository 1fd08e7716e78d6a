"""``python -m kvtier.daemon [--config FILE] [--set SECTION.FIELD=VALUE ...] [--log-level L] {serve,stats} ...``.

The same commands, with the same global options, as ``kvtier serve`` and ``kvtier stats``, for tests and
for machines without the ``kvtier`` entry point. Promise: the exit status is the command's ``run`` result,
or 2 with a one-line message for a bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kvtier.config import load_config
from kvtier.daemon import serve_cmd, stats_cmd
from kvtier.errors import KvtierError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.daemon")
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("serve", serve_cmd), ("stats", stats_cmd)):
        module.add_arguments(commands.add_parser(name, help=module.HELP))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, dict(item.split("=", 1) for item in args.overrides if "=" in item))
        if args.command == "serve":
            return serve_cmd.run(args, config)
        return stats_cmd.run(args, config)
    except KvtierError as exc:
        print(f"kvtier {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
