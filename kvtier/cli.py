"""The ``kvtier`` command: ``demo``, ``serve``, ``stats`` and ``bench <name>``.

Every command module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args, config) -> int``; this
file only builds the parser and loads the configuration. Global options, before the command:

- ``--config FILE``: a TOML file (see ``kvtier.config`` for every setting and its default);
- ``--set section.field=value`` (repeatable): override one setting, e.g. ``--set host.capacity_bytes=4GiB``.

Promises: a bad configuration or bad input exits with status 2 and a one-line ``kvtier: error: ...`` on
stderr (no traceback); a command's own failure exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from kvtier.config import load_config
from kvtier.errors import KvtierError

COMMANDS: dict[str, str] = {
    "demo": "kvtier.demo",
    "serve": "kvtier.daemon.serve_cmd",
    "stats": "kvtier.daemon.stats_cmd",
}
BENCHMARKS: dict[str, str] = {
    "host": "kvtier.bench.host",
    "disk": "kvtier.bench.disk",
    "replay": "kvtier.bench.replay",
    "gather": "kvtier.bench.gather",
    "daemon": "kvtier.bench.daemon",
}


def _add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                 module_name: str) -> None:
    module: ModuleType = importlib.import_module(module_name)
    parser = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
    module.add_arguments(parser)
    parser.set_defaults(command_module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache offload for LLM inference.")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        _add_command(commands, name, module_name)
    bench = commands.add_parser("bench", help="offload microbenchmarks against raw baselines in the same run")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in BENCHMARKS.items():
        _add_command(benchmarks, name, module_name)
    return parser


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise KvtierError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, _parse_overrides(args.overrides))
        status: int = args.command_module.run(args, config)
    except KvtierError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
