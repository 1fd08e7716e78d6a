"""``kvtier bench replay``: a request trace replayed through the store's tiering, against single-tier baselines.

The replay (``kvtier.replay``) runs host RAM under the host policy over a region-log disk under the disk
admission policy, with no payload bytes, and reports hit ratios and disk writes. Baselines on the same trace:
single-tier caches of the same total capacity (host + disk blocks) that admit everything (``lru``,
``s3fifo``, ``arc``, and ``belady``, the offline optimum with bypass), and the same two tiers with
``admit_all`` admission, whose disk writes are ``baseline_disk_blocks_written``.

Promises:
- ``run_replay`` returns one JSON-ready dict; ratios are fractions in [0, 1] rounded to 4 places.
- Capacities are given in blocks or as a share of the trace's unique blocks (``int(frac * unique)``),
  exactly one of the two per tier; anything else is a ``ConfigError``. A trace that cannot be read or
  parsed is an ``InvalidInputError`` naming the file and line.
- The policy, admission and reinsertion default to the configuration's (``host.policy``,
  ``disk.admission``, ``disk.reinsert_hits``) on the command line, and to the store's defaults in Python.
- With a drive bandwidth (``drive_write_bytes_per_s``) the tiered replay (not the baselines) runs on the
  trace's clock (``kvtier.replay.DriveModel``) and the dict also holds ``dropped_buffer_full`` and
  ``dropped_over_budget``. The write-back buffer and the budget default to the configuration's
  (``disk.writeback_buffer_bytes``; ``disk.write_budget_bytes_per_s`` or ``disk.write_budget_dwpd``, the
  latter of a drive of the replay's disk capacity in bytes); setting both budgets is a ``ConfigError``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvtier.config import DiskConfig, HostConfig, StoreConfig, parse_bytes
from kvtier.errors import ConfigError
from kvtier.replay import (
    DEFAULT_BLOCKS_PER_REGION,
    TRACE_BLOCK_TOKENS,
    DriveModel,
    load_trace,
    replay_belady,
    replay_single,
    replay_tiered,
)

HELP = "replay a Mooncake-format trace through host RAM and the disk tier (no payloads) against baselines"
BASELINE_POLICIES = ("lru", "s3fifo", "arc")
# A 512-token block of Llama-3-8B in bf16 (32 layers x 8 KV heads x 128 x K and V x 2 bytes a token).
DEFAULT_BLOCK_BYTES = 64 << 20


def _capacity(blocks: int | None, frac: float | None, unique_blocks: int, tier: str, minimum: int) -> int:
    if frac is None:
        if blocks is None:
            raise ConfigError(f"give one of {tier}_blocks and {tier}_frac")
        count = blocks
    elif blocks is not None:
        raise ConfigError(f"give only one of {tier}_blocks and {tier}_frac")
    elif not 0.0 <= frac <= 1.0:
        raise ConfigError(f"{tier}_frac must be between 0 and 1, got {frac}")
    else:
        count = int(frac * unique_blocks)
    if count < minimum:
        raise ConfigError(f"the {tier} tier needs at least {minimum} block(s), got {count}")
    return count


def run_replay(trace_path: str | Path, *, block_tokens: int = TRACE_BLOCK_TOKENS, host_blocks: int | None = None,
               host_frac: float | None = None, disk_blocks: int | None = None, disk_frac: float | None = None,
               policy: str = HostConfig.policy, admission: str = DiskConfig.admission,
               blocks_per_region: int = DEFAULT_BLOCKS_PER_REGION, reinsert_hits: int = DiskConfig.reinsert_hits,
               baselines: bool = True, drive_write_bytes_per_s: float = 0.0,
               block_bytes: int = DEFAULT_BLOCK_BYTES, time_scale: float = 1.0,
               writeback_buffer_bytes: int = DiskConfig.writeback_buffer_bytes,
               write_budget_bytes_per_s: float = 0.0, write_budget_dwpd: float = 0.0) -> dict[str, Any]:
    """Replay the trace at ``trace_path``; see the module docstring for what the dict holds."""
    started = time.perf_counter()
    trace = load_trace(trace_path, block_tokens)
    unique = trace.unique_blocks
    host = _capacity(host_blocks, host_frac, unique, "host", 1)
    disk = _capacity(disk_blocks, disk_frac, unique, "disk", 0)
    if write_budget_bytes_per_s and write_budget_dwpd:
        raise ConfigError("give at most one of write_budget_bytes_per_s and write_budget_dwpd")
    if write_budget_dwpd < 0:
        raise ConfigError(f"write_budget_dwpd must be >= 0, got {write_budget_dwpd}")
    drive = None
    if drive_write_bytes_per_s:
        budget = write_budget_bytes_per_s or write_budget_dwpd * disk * block_bytes / 86_400
        drive = DriveModel(block_bytes, drive_write_bytes_per_s, writeback_buffer_bytes, budget, time_scale)
    tiered = replay_tiered(trace, host, disk, policy=policy, admission=admission,
                           blocks_per_region=blocks_per_region, reinsert_hits=reinsert_hits, drive=drive)
    result: dict[str, Any] = {
        "trace": str(trace_path),
        "requests": tiered.requests,
        "block_tokens": block_tokens,
        "unique_blocks": unique,
        "referenced_blocks": tiered.referenced_blocks,
        "host_blocks": host,
        "disk_blocks": disk,
        "policy": policy,
        "admission": admission,
        "blocks_per_region": blocks_per_region,
        "reinsert_hits": reinsert_hits,
        "block_hit_ratio": round(tiered.block_hit_ratio, 4),
        "host_hit_ratio": round(tiered.host_hit_ratio, 4),
        "disk_hit_ratio": round(tiered.disk_hit_ratio, 4),
        "disk_blocks_written": tiered.disk_blocks_written,
        "disk_blocks_reinserted": tiered.disk_blocks_reinserted,
        "disk_offers": tiered.disk_offers,
        "disk_admitted": tiered.disk_admitted,
    }
    if drive is not None:
        result.update({"block_bytes": block_bytes, "drive_write_bytes_per_s": drive.write_bytes_per_s,
                       "writeback_buffer_bytes": writeback_buffer_bytes,
                       "write_budget_bytes_per_s": round(drive.budget_bytes_per_s), "time_scale": time_scale,
                       "dropped_buffer_full": tiered.dropped_buffer_full,
                       "dropped_over_budget": tiered.dropped_over_budget})
    if baselines:
        total = host + disk
        admit_all = tiered if admission == "admit_all" else replay_tiered(
            trace, host, disk, policy=policy, admission="admit_all", blocks_per_region=blocks_per_region,
            reinsert_hits=reinsert_hits)
        ratios = {name: replay_single(trace, total, name) for name in BASELINE_POLICIES}
        ratios["belady"] = replay_belady(trace, total)
        result["baseline_capacity_blocks"] = total
        result["baselines"] = {name: round(ratio, 4) for name, ratio in ratios.items()}
        result["baseline_admit_all_block_hit_ratio"] = round(admit_all.block_hit_ratio, 4)
        result["baseline_disk_blocks_written"] = admit_all.disk_blocks_written
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, metavar="FILE", help="Mooncake-format JSONL trace")
    parser.add_argument("--block-tokens", type=int, default=TRACE_BLOCK_TOKENS,
                        help="tokens per store block, a multiple of the trace's 512")
    host = parser.add_mutually_exclusive_group(required=True)
    host.add_argument("--host-blocks", type=int, help="host tier capacity in blocks")
    host.add_argument("--host-frac", type=float, help="host tier capacity as a share of the trace's unique blocks")
    disk = parser.add_mutually_exclusive_group(required=True)
    disk.add_argument("--disk-blocks", type=int, help="disk tier capacity in blocks (0: no disk tier)")
    disk.add_argument("--disk-frac", type=float, help="disk tier capacity as a share of the trace's unique blocks")
    parser.add_argument("--policy", default=None, help="host eviction policy (default: host.policy)")
    parser.add_argument("--admission", default=None, help="disk admission policy (default: disk.admission)")
    parser.add_argument("--blocks-per-region", type=int, default=DEFAULT_BLOCKS_PER_REGION,
                        help="blocks per disk region, the unit of eviction")
    parser.add_argument("--reinsert-hits", type=int, default=None,
                        help="disk reads that earn a block reinsertion (default: disk.reinsert_hits; 0: never)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the single-tier and admit-all baselines")
    clock = parser.add_argument_group("clock", "replay on the trace's timestamps over a drive of limited bandwidth")
    clock.add_argument("--drive-write-rate", default=None, metavar="BYTES",
                       help="the drive's write bandwidth in bytes per second (e.g. 1.5GB); enables the clock")
    clock.add_argument("--block-bytes", default=None, metavar="BYTES",
                       help="bytes of one block's KV (default 64MiB: 512 tokens of Llama-3-8B in bf16)")
    clock.add_argument("--time-scale", type=float, default=1.0,
                       help="multiplies the trace's times (0.5: requests arrive twice as fast)")
    clock.add_argument("--writeback-buffer", default=None, metavar="BYTES",
                       help="the write-back buffer (default: disk.writeback_buffer_bytes)")
    budget = clock.add_mutually_exclusive_group()
    budget.add_argument("--write-budget-rate", default=None, metavar="BYTES",
                        help="write budget in bytes per second (default: disk.write_budget_bytes_per_s)")
    budget.add_argument("--write-budget-dwpd", type=float, default=None,
                        help="write budget in drive writes per day of the replay's disk "
                             "(default: disk.write_budget_dwpd)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    result = run_replay(
        args.trace, block_tokens=args.block_tokens, host_blocks=args.host_blocks, host_frac=args.host_frac,
        disk_blocks=args.disk_blocks, disk_frac=args.disk_frac, policy=args.policy or config.host.policy,
        admission=args.admission or config.disk.admission, blocks_per_region=args.blocks_per_region,
        reinsert_hits=config.disk.reinsert_hits if args.reinsert_hits is None else args.reinsert_hits,
        baselines=not args.no_baselines, **_clock_settings(args, config.disk))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['requests']} requests, host {result['host_blocks']} + disk {result['disk_blocks']} blocks "
          f"({result['policy']}, {result['admission']}): hit ratio {result['block_hit_ratio']} "
          f"(host {result['host_hit_ratio']}, disk {result['disk_hit_ratio']}), "
          f"{result['disk_blocks_written']} disk blocks written")
    if "dropped_buffer_full" in result:
        print(f"on the trace's clock ({result['drive_write_bytes_per_s'] / 1e9:.2f} GB/s drive, "
              f"{result['writeback_buffer_bytes'] >> 20} MiB write-back buffer, budget "
              f"{result['write_budget_bytes_per_s'] / 1e6:.1f} MB/s): {result['dropped_buffer_full']} blocks dropped "
              f"with the buffer full, {result['dropped_over_budget']} over the budget")
    if "baselines" in result:
        shown = ", ".join(f"{name} {ratio}" for name, ratio in result["baselines"].items())
        print(f"single tier of {result['baseline_capacity_blocks']} blocks: {shown}; admit_all: hit ratio "
              f"{result['baseline_admit_all_block_hit_ratio']}, {result['baseline_disk_blocks_written']} written")
    return 0


def _clock_settings(args: argparse.Namespace, disk: DiskConfig) -> dict[str, Any]:
    """``run_replay``'s clock arguments from the command line, defaults from the ``[disk]`` configuration."""
    if args.drive_write_rate is None:
        return {}
    settings: dict[str, Any] = {
        "drive_write_bytes_per_s": parse_bytes(args.drive_write_rate, "--drive-write-rate"),
        "time_scale": args.time_scale,
        "writeback_buffer_bytes": parse_bytes(args.writeback_buffer or disk.writeback_buffer_bytes,
                                              "--writeback-buffer"),
    }
    if args.block_bytes is not None:
        settings["block_bytes"] = parse_bytes(args.block_bytes, "--block-bytes")
    if args.write_budget_rate is not None:
        settings["write_budget_bytes_per_s"] = parse_bytes(args.write_budget_rate, "--write-budget-rate")
    elif args.write_budget_dwpd is not None:
        settings["write_budget_dwpd"] = args.write_budget_dwpd
    else:
        settings["write_budget_bytes_per_s"] = disk.write_budget_bytes_per_s
        settings["write_budget_dwpd"] = disk.write_budget_dwpd
    return settings
