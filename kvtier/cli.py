"""The ``kvtier`` command: ``demo``, ``serve``, ``stats`` and ``bench <name>``.

Every command module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args, config) -> int``; this
file only builds the parser and loads the configuration. Only the module of the command being run is
imported (the demo's pulls in transformers, which takes seconds). Global options, before the command:

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

from kvtier.config import load_config
from kvtier.errors import KvtierError

# name -> (module, one-line help). The help is repeated here so that ``kvtier --help`` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvtier_connectors.transformers.demo",
             "multi-turn chat on a small random-weight Llama: restore vs recompute, logits compared"),
    "serve": ("kvtier.daemon.serve_cmd", "run the daemon: one host pool and disk tier for every engine process"),
    "stats": ("kvtier.daemon.stats_cmd", "print a running daemon's statistics (a table, or JSON)"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "host": ("kvtier.bench.host", "host-tier put/get GB/s vs a raw copy; key derivation and lookup cost"),
    "disk": ("kvtier.bench.disk", "disk-tier write/read GB/s vs raw O_DIRECT I/O on the same filesystem"),
    "replay": ("kvtier.bench.replay", "replay a Mooncake-format trace through the tiers' policies, no payloads"),
    "ttft": ("kvtier_connectors.transformers.bench_ttft", "time to first token: restore from host/disk vs recompute"),
    "gather": ("kvtier.bench.gather", "paged-KV gather/scatter GB/s vs a contiguous copy"),
    "daemon": ("kvtier.bench.daemon", "daemon vs embedded store throughput; lookup latency with 1-4 clients"),
    "remote": ("kvtier.bench.remote", "remote-tier put/get GB/s vs raw pipelined SET/GET; 64-key lookup latency"),
    "alternatives": ("kvtier.bench.alternatives",
                     "kvtier vs recompute, a safetensors file per prefix, LMDB blobs: TTFT, hit ratio, disk bytes"),
    "peers": ("kvtier.bench.peers", "kvtier vs vLLM's native CPU offloading and LMCache in one real vLLM engine "
              "(run with --python of the peers env: make bench-peers)"),
    "scaling": ("kvtier.bench.scaling", "lookup/put/get cost vs blocks stored (10^3-10^6) and prompt length"),
    "all": ("kvtier.bench.all", "run every benchmark into one directory: JSON records and plots"),
    "report": ("kvtier.bench.report", "generate docs/benchmarks.md from a `kvtier bench all` directory"),
}
_GLOBAL_OPTIONS_WITH_VALUES = {"--config", "--set", "--log-level"}


def _chosen(argv: Sequence[str]) -> list[str]:
    """The command words of ``argv`` (e.g. ``["bench", "disk"]``), skipping global options and their values."""
    words: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
        elif token in _GLOBAL_OPTIONS_WITH_VALUES:
            skip_value = True
        elif not token.startswith("-"):
            words.append(token)
            if len(words) == 2 or words[0] != "bench":
                break
    return words


def _add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                  table: dict[str, tuple[str, str]], chosen: str | None) -> None:
    for name, (module_name, help_text) in table.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(parser)
            parser.set_defaults(command_module=module)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command named in ``argv`` (only its module is imported)."""
    words = _chosen(argv)
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache offload for LLM inference.")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting (repeatable)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(commands, COMMANDS, words[0] if words else None)
    bench = commands.add_parser("bench", help="offload microbenchmarks against raw baselines in the same run")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_commands(benchmarks, BENCHMARKS, words[1] if words[:1] == ["bench"] and len(words) > 1 else None)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
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
