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
- The policy, admission, reinsertion and fewest regions default to the configuration's (``host.policy``,
  ``disk.admission``, ``disk.reinsert_hits``, ``disk.min_regions``: a small disk's regions shrink to give it
  that many, as the store's tier does) on the command line, and to the store's defaults in Python.
- ``run_table`` (``--table``) replays each trace, files and generated shapes (``kvtier.bench.traces``,
  seeded), at each disk size (default 1, 2, 5, 10 and 20% of its unique blocks, host 0.5%) and reports
  per row kvtier, LRU, S3-FIFO, ARC and Belady at the same total capacity, admit-all's hits, the writes
  over admit-all's, and whether the row meets the targets (``TARGET_*``).
- With a drive bandwidth (``drive_write_bytes_per_s``) the tiered replay (not the baselines) runs on the
  trace's clock (``kvtier.replay.DriveModel``) and the dict also holds ``dropped_buffer_full`` and
  ``dropped_over_budget``. The write-back buffer and the budget default to the configuration's
  (``disk.writeback_buffer_bytes``; ``disk.write_budget_bytes_per_s`` or ``disk.write_budget_dwpd``, the
  latter of ``drive_bytes``, by default the replay's disk capacity in bytes; ``disk.write_budget_burst_s``
  of budget saved up at most); setting both budgets is a ``ConfigError``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtier.bench.traces import SHAPES, generate, write_trace
from kvtier.config import DiskConfig, HostConfig, StoreConfig, parse_bytes
from kvtier.errors import ConfigError
from kvtier.replay import (
    DEFAULT_BLOCKS_PER_REGION,
    TRACE_BLOCK_TOKENS,
    DriveModel,
    Trace,
    load_trace,
    replay_belady,
    replay_single,
    replay_tiered,
)

HELP = "replay a Mooncake-format trace through host RAM and the disk tier (no payloads) against baselines"
BASELINE_POLICIES = ("lru", "s3fifo", "arc")
# A 512-token block of Llama-3-8B in bf16 (32 layers x 8 KV heads x 128 x K and V x 2 bytes a token).
DEFAULT_BLOCK_BYTES = 64 << 20
# The table's disk sizes, as shares of a trace's unique blocks, and the policy's targets (docs/policy.md):
# at most 0.3 points below the best classic; at 1% disk, half of Belady; writes at 1-2% a third of admit-all's.
DISK_FRACS = (0.01, 0.02, 0.05, 0.1, 0.2)
TARGET_BELOW_BEST = 0.003
TARGET_OF_BELADY = 0.5
TARGET_SMALL_WRITES = 1 / 3


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
               write_budget_bytes_per_s: float = 0.0, write_budget_dwpd: float = 0.0, drive_bytes: int = 0,
               write_budget_burst_s: float = DiskConfig.write_budget_burst_s,
               min_regions: int = DiskConfig.min_regions) -> dict[str, Any]:
    """Replay the trace at ``trace_path``; see the module docstring for what the dict holds."""
    started = time.perf_counter()
    trace = load_trace(trace_path, block_tokens)
    result = replay_trace(
        trace, str(trace_path), host_blocks=host_blocks, host_frac=host_frac, disk_blocks=disk_blocks,
        disk_frac=disk_frac, policy=policy, admission=admission, blocks_per_region=blocks_per_region,
        reinsert_hits=reinsert_hits, baselines=baselines, drive_write_bytes_per_s=drive_write_bytes_per_s,
        block_bytes=block_bytes, time_scale=time_scale, writeback_buffer_bytes=writeback_buffer_bytes,
        write_budget_bytes_per_s=write_budget_bytes_per_s, write_budget_dwpd=write_budget_dwpd,
        drive_bytes=drive_bytes, write_budget_burst_s=write_budget_burst_s, min_regions=min_regions)
    result["block_tokens"] = block_tokens
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def replay_trace(trace: Trace, name: str, *, host_blocks: int | None = None, host_frac: float | None = None,
                 disk_blocks: int | None = None, disk_frac: float | None = None, policy: str = HostConfig.policy,
                 admission: str = DiskConfig.admission, blocks_per_region: int = DEFAULT_BLOCKS_PER_REGION,
                 reinsert_hits: int = DiskConfig.reinsert_hits, baselines: bool = True,
                 drive_write_bytes_per_s: float = 0.0, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 time_scale: float = 1.0, writeback_buffer_bytes: int = DiskConfig.writeback_buffer_bytes,
                 write_budget_bytes_per_s: float = 0.0, write_budget_dwpd: float = 0.0, drive_bytes: int = 0,
                 write_budget_burst_s: float = DiskConfig.write_budget_burst_s,
                 min_regions: int = DiskConfig.min_regions) -> dict[str, Any]:
    """``run_replay`` on a trace already in memory, named ``name`` in the result."""
    unique = trace.unique_blocks
    host = _capacity(host_blocks, host_frac, unique, "host", 1)
    disk = _capacity(disk_blocks, disk_frac, unique, "disk", 0)
    if write_budget_bytes_per_s and write_budget_dwpd:
        raise ConfigError("give at most one of write_budget_bytes_per_s and write_budget_dwpd")
    if write_budget_dwpd < 0 or drive_bytes < 0:
        raise ConfigError(f"write_budget_dwpd and drive_bytes must be >= 0, got {write_budget_dwpd}, {drive_bytes}")
    drive = None
    if drive_write_bytes_per_s:
        budget = write_budget_bytes_per_s or write_budget_dwpd * (drive_bytes or disk * block_bytes) / 86_400
        drive = DriveModel(block_bytes, drive_write_bytes_per_s, writeback_buffer_bytes, budget, time_scale,
                           write_budget_burst_s)
    tiered = replay_tiered(trace, host, disk, policy=policy, admission=admission,
                           blocks_per_region=blocks_per_region, reinsert_hits=reinsert_hits, drive=drive,
                           min_regions=min_regions)
    result: dict[str, Any] = {
        "trace": name,
        "requests": tiered.requests,
        "unique_blocks": unique,
        "referenced_blocks": tiered.referenced_blocks,
        "host_blocks": host,
        "disk_blocks": disk,
        "policy": policy,
        "admission": admission,
        "blocks_per_region": blocks_per_region,
        "reinsert_hits": reinsert_hits,
        "min_regions": min_regions,
        "block_hit_ratio": round(tiered.block_hit_ratio, 4),
        "host_hit_ratio": round(tiered.host_hit_ratio, 4),
        "disk_hit_ratio": round(tiered.disk_hit_ratio, 4),
        "disk_blocks_written": tiered.disk_blocks_written,
        "disk_blocks_reinserted": tiered.disk_blocks_reinserted,
        "disk_offers": tiered.disk_offers,
        "disk_admitted": tiered.disk_admitted,
        "disk_left_to_host": tiered.disk_left_to_host,
        "disk_moved_to_host": tiered.disk_moved_to_host,
    }
    if drive is not None:
        result.update({"block_bytes": block_bytes, "drive_write_bytes_per_s": drive.write_bytes_per_s,
                       "writeback_buffer_bytes": writeback_buffer_bytes,
                       "write_budget_bytes_per_s": round(drive.budget_bytes_per_s), "time_scale": time_scale,
                       "write_budget_burst_s": write_budget_burst_s,
                       "dropped_buffer_full": tiered.dropped_buffer_full,
                       "dropped_over_budget": tiered.dropped_over_budget})
    if baselines:
        total = host + disk
        admit_all = tiered if admission == "admit_all" else replay_tiered(
            trace, host, disk, policy=policy, admission="admit_all", blocks_per_region=blocks_per_region,
            reinsert_hits=reinsert_hits, min_regions=min_regions)
        ratios = {name: replay_single(trace, total, name) for name in BASELINE_POLICIES}
        ratios["belady"] = replay_belady(trace, total)
        result["baseline_capacity_blocks"] = total
        result["baselines"] = {name: round(ratio, 4) for name, ratio in ratios.items()}
        result["baseline_admit_all_block_hit_ratio"] = round(admit_all.block_hit_ratio, 4)
        result["baseline_disk_blocks_written"] = admit_all.disk_blocks_written
    return result


def run_table(traces: Sequence[tuple[str, Trace]], *, host_frac: float = 0.005,
              disk_fracs: Sequence[float] = DISK_FRACS, policy: str = HostConfig.policy,
              admission: str = DiskConfig.admission, blocks_per_region: int = DEFAULT_BLOCKS_PER_REGION,
              reinsert_hits: int = DiskConfig.reinsert_hits,
              min_regions: int = DiskConfig.min_regions) -> list[dict[str, Any]]:
    """One row per trace and disk size: kvtier, the classics and Belady at the same total capacity, the
    writes against admit-all's, and whether the row meets the targets (module docstring)."""
    rows: list[dict[str, Any]] = []
    for name, trace in traces:
        for frac in disk_fracs:
            result = replay_trace(trace, name, host_frac=host_frac, disk_frac=frac, policy=policy,
                                  admission=admission, blocks_per_region=blocks_per_region,
                                  reinsert_hits=reinsert_hits, min_regions=min_regions)
            ratios = result["baselines"]
            best = max(BASELINE_POLICIES, key=lambda policy_name: ratios[policy_name])
            hit = result["block_hit_ratio"]
            writes = result["disk_blocks_written"] / max(1, result["baseline_disk_blocks_written"])
            of_belady = hit / ratios["belady"] if ratios["belady"] else 1.0
            meets = (hit - ratios[best] >= -TARGET_BELOW_BEST and (frac > 0.01 or of_belady >= TARGET_OF_BELADY)
                     and writes <= (TARGET_SMALL_WRITES if frac <= 0.02 else 1.0))
            rows.append({"trace": name, "disk_frac": frac, "host_blocks": result["host_blocks"],
                         "disk_blocks": result["disk_blocks"], "kvtier": hit, **ratios, "best_classic": best,
                         "kvtier_minus_best": round(hit - ratios[best], 4), "kvtier_of_belady": round(of_belady, 3),
                         "admit_all": result["baseline_admit_all_block_hit_ratio"],
                         "disk_blocks_written": result["disk_blocks_written"],
                         "admit_all_disk_blocks_written": result["baseline_disk_blocks_written"],
                         "writes_of_admit_all": round(writes, 3), "meets_targets": meets})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``run_table``'s rows as a Markdown table, hit ratios in %."""
    lines = ["| trace | disk | kvtier | LRU | S3-FIFO | ARC | kvtier - best | Belady | kvtier / Belady "
             "| admit-all | writes / admit-all | targets |", "|" + " --- |" * 12]
    for row in rows:
        lines.append(
            f"| {row['trace']} | {100 * row['disk_frac']:g}% | {100 * row['kvtier']:.2f} | {100 * row['lru']:.2f} "
            f"| {100 * row['s3fifo']:.2f} | {100 * row['arc']:.2f} | {100 * row['kvtier_minus_best']:+.2f} "
            f"| {100 * row['belady']:.2f} | {row['kvtier_of_belady']:.2f} | {100 * row['admit_all']:.2f} "
            f"| {row['writes_of_admit_all']:.3f} | {'met' if row['meets_targets'] else 'missed'} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", action="append", default=[], metavar="FILE",
                        help="Mooncake-format JSONL trace (with --table: may be given more than once)")
    table = parser.add_argument_group("table", "every trace at every disk size, against the baselines")
    table.add_argument("--table", action="store_true",
                       help="replay each trace (--trace, --shape) at each --disk-fracs size, host --host-frac")
    table.add_argument("--shape", action="append", default=[], choices=[*SHAPES, "all"],
                       help="a generated trace of this shape (kvtier.bench.traces); 'all': every shape")
    table.add_argument("--seed", type=int, default=0, help="seed of the generated traces")
    table.add_argument("--save-traces", default=None, metavar="DIR",
                       help="also write each generated trace to DIR/SHAPE-seedSEED.jsonl (Mooncake format)")
    table.add_argument("--disk-fracs", default=",".join(f"{frac:g}" for frac in DISK_FRACS),
                       help="comma-separated disk sizes as shares of each trace's unique blocks")
    parser.add_argument("--block-tokens", type=int, default=TRACE_BLOCK_TOKENS,
                        help="tokens per store block, a multiple of the trace's 512")
    host = parser.add_mutually_exclusive_group()
    host.add_argument("--host-blocks", type=int, help="host tier capacity in blocks")
    host.add_argument("--host-frac", type=float, help="host tier capacity as a share of the trace's unique blocks")
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument("--disk-blocks", type=int, help="disk tier capacity in blocks (0: no disk tier)")
    disk.add_argument("--disk-frac", type=float, help="disk tier capacity as a share of the trace's unique blocks")
    parser.add_argument("--policy", default=None, help="host eviction policy (default: host.policy)")
    parser.add_argument("--admission", default=None, help="disk admission policy (default: disk.admission)")
    parser.add_argument("--blocks-per-region", type=int, default=DEFAULT_BLOCKS_PER_REGION,
                        help="blocks per disk region, the unit of eviction (fewer on a disk of less than "
                             "disk.min_regions regions)")
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
                        help="write budget in drive writes per day of --drive-bytes (default: disk.write_budget_dwpd)")
    clock.add_argument("--drive-bytes", default=None, metavar="BYTES",
                       help="the drive the DWPD budget is stated against (default: disk.drive_bytes; 0: the "
                            "replay's disk)")
    clock.add_argument("--write-budget-burst", type=float, default=None, metavar="SECONDS",
                       help="seconds of budget that may be saved up and spent at once "
                            "(default: disk.write_budget_burst_s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    if args.table:
        return _run_table(args, config)
    if len(args.trace) != 1 or args.shape:
        raise ConfigError("give one --trace (or --table to replay several traces and --shape)")
    result = run_replay(
        args.trace[0], block_tokens=args.block_tokens, host_blocks=args.host_blocks, host_frac=args.host_frac,
        disk_blocks=args.disk_blocks, disk_frac=args.disk_frac, policy=args.policy or config.host.policy,
        admission=args.admission or config.disk.admission, blocks_per_region=args.blocks_per_region,
        reinsert_hits=config.disk.reinsert_hits if args.reinsert_hits is None else args.reinsert_hits,
        baselines=not args.no_baselines, min_regions=config.disk.min_regions, **_clock_settings(args, config.disk))
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


def _run_table(args: argparse.Namespace, config: StoreConfig) -> int:
    if args.disk_blocks is not None or args.disk_frac is not None or args.host_blocks is not None:
        raise ConfigError("--table takes --host-frac and --disk-fracs, not block counts or --disk-frac")
    try:
        fracs = [float(frac) for frac in args.disk_fracs.split(",")]
    except ValueError:
        raise ConfigError(f"--disk-fracs must be comma-separated numbers, got {args.disk_fracs!r}") from None
    shapes = list(SHAPES) if "all" in args.shape else list(dict.fromkeys(args.shape))
    traces = [(str(path), load_trace(path, args.block_tokens)) for path in args.trace]
    for shape in shapes:
        trace, outputs = generate(shape, args.seed)
        if args.save_traces:
            Path(args.save_traces).mkdir(parents=True, exist_ok=True)
            write_trace(Path(args.save_traces) / f"{shape}-seed{args.seed}.jsonl", trace, outputs)
        traces.append((f"{shape} (seed {args.seed})", trace))
    if not traces:
        raise ConfigError("--table needs at least one --trace or --shape")
    rows = run_table(traces, host_frac=0.005 if args.host_frac is None else args.host_frac, disk_fracs=fracs,
                     policy=args.policy or config.host.policy, admission=args.admission or config.disk.admission,
                     blocks_per_region=args.blocks_per_region,
                     reinsert_hits=config.disk.reinsert_hits if args.reinsert_hits is None else args.reinsert_hits,
                     min_regions=config.disk.min_regions)
    print(json.dumps(rows) if args.json else format_table(rows))
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
        "drive_bytes": parse_bytes(args.drive_bytes or disk.drive_bytes, "--drive-bytes"),
        "write_budget_burst_s": (disk.write_budget_burst_s if args.write_budget_burst is None
                                 else args.write_budget_burst),
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
