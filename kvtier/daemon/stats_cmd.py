"""``kvtier stats``: the daemon's counters, as a table for a person or as JSON.

Promises:
- It connects as an observer (a hello without a layout), so it works before any client and never changes
  the daemon's state; it reads the same counters the Prometheus endpoint exports.
- Exit status 0 with the stats printed; 1 with a one-line message when the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvtier.config import StoreConfig
from kvtier.daemon.client import Connection
from kvtier.errors import KvtierError

HELP = "print the kvtier daemon's statistics (a table, or JSON with --json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="daemon address: unix, unix:PATH or tcp://HOST:PORT (default: the socket)")
    parser.add_argument("--socket", help="Unix socket path (shorthand for --address unix:PATH)")
    parser.add_argument("--token", help="token for a TCP address (default daemon.tcp_token)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def fetch(address: str, config: StoreConfig, token: str | None = None) -> dict[str, Any]:
    """The daemon's ``stats`` reply: ``{"stats": StoreStats dict or None, "daemon": {...}}``."""
    conn = Connection(address, config, token=token, timeout=10.0)
    try:
        reply = conn.call("stats")
    finally:
        conn.close()
    return {"stats": reply["stats"], "daemon": reply["daemon"]}


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _rows(title: str, rows: list[tuple[str, object]]) -> list[str]:
    width = max(len(name) for name, _ in rows)
    return [title, *(f"  {name:<{width}}  {value}" for name, value in rows), ""]


def render(data: dict[str, Any]) -> str:
    """A readable multi-table rendering of ``fetch``'s result."""
    daemon, stats = data["daemon"], data["stats"]
    pool = "-" if daemon["pool_bytes"] is None else _size(daemon["pool_bytes"])
    lines = _rows("daemon", [
        ("pid", daemon["pid"]), ("uptime", f"{daemon['uptime_s']:.0f} s"), ("socket", daemon["socket_path"]),
        ("tcp", daemon["tcp"] or "off"), ("metrics port", daemon["metrics_port"] or "off"),
        ("layout", daemon["layout"] or "none yet"), ("host pool", pool),
        ("clients", f"unix {daemon['clients']['unix']}, tcp {daemon['clients']['tcp']}"),
        ("namespaces", ", ".join(f"{name} {count}" for name, count in sorted(daemon["namespaces"].items())) or "-"),
        ("reserved / leased blocks", f"{daemon['reserved_blocks']} / {daemon['leased_blocks']}"),
        ("held after error", f"{daemon['held_after_error']} connections"),
        ("auth failures", daemon["auth_failures"]),
        ("error replies", ", ".join(f"{k} {v}" for k, v in sorted(daemon["error_replies"].items())) or "0"),
    ])
    if stats is not None:
        lookups = stats["hit_blocks"] + stats["miss_blocks"]
        lines += _rows("store", [
            ("lookups", stats["lookups"]),
            ("hit / miss blocks", f"{stats['hit_blocks']} / {stats['miss_blocks']}"
                                  + (f" ({stats['hit_blocks'] / lookups:.1%} hits)" if lookups else "")),
            ("put blocks (dedup, failed)", f"{stats['put_blocks']} ({stats['put_deduplicated_blocks']}, "
                                           f"{stats['put_failed_blocks']})"),
            ("get blocks (failed)", f"{stats['get_blocks']} ({stats['get_failed_blocks']})"),
            ("bytes put / got", f"{_size(stats['bytes_put'])} / {_size(stats['bytes_got'])}"),
            ("write-through skipped / failed", f"{stats['write_through_skipped_blocks']} / "
                                               f"{stats['write_through_failed_blocks']}"),
        ])
        header = f"  {'tier':<6}{'used':>10}{'capacity':>10}{'occupancy':>10}{'hits':>10}{'evicted':>10}" \
                 f"{'read':>12}{'written':>12}"
        lines += ["tiers", header]
        for name, tier in stats["tiers"].items():
            occupancy = tier["used_blocks"] / max(1, tier["capacity_blocks"])
            lines.append(f"  {name:<6}{tier['used_blocks']:>10}{tier['capacity_blocks']:>10}{occupancy:>10.1%}"
                         f"{tier['hit_blocks']:>10}{tier['evicted_blocks']:>10}{_size(tier['bytes_read']):>12}"
                         f"{_size(tier['bytes_written']):>12}")
        lines.append("")
        disk = stats["tiers"].get("disk", {}).get("detail", {})
        if "admitting" in disk:
            fault = disk.get("fault") or "fault"
            state = "admitting" if disk["admitting"] else f"degraded ({fault}): refusing new blocks"
            lines += _rows("disk", [
                ("state", state),
                ("errors: full / io / checksum", f"{disk.get('disk_full_errors', 0)} / {disk.get('io_errors', 0)} / "
                                                 f"{disk.get('checksum_failures', 0)}"),
                ("refused while degraded", disk.get("degraded_rejected", 0)),
            ])
    if daemon["ops"]:
        lines += ["ops", f"  {'op':<10}{'count':>10}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}"]
        for op, hist in daemon["ops"].items():
            lines.append(f"  {op:<10}{hist['count']:>10}{hist['mean_us']:>10.0f}{hist['p50_us']:>10.0f}"
                         f"{hist['p99_us']:>10.0f}")
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    address = args.address or (f"unix:{args.socket}" if args.socket else config.daemon.connect or "unix")
    try:
        data = fetch(address, config, args.token)
    except KvtierError as exc:
        print(f"kvtier stats: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n" if args.json else render(data))
    return 0
