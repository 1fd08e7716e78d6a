"""``kvtier bench remote``: the remote tier against raw pipelined SET/GET with the same client, in one run.

For each mode (``single``: one server; ``cluster``: 3 masters), on servers it starts itself on loopback
unless ``[remote] urls`` are configured (then only the configured mode, on those servers):
- raw put / get: pipelined SET / GET of values of the same size as the tier's (header + block), in
  batches of ``remote.batch_bytes``, through a client built the same way as the tier's.
- kvtier put: ``offer`` of every block (unique keys), lent as the store's write-through lends a pinned
  host slot, then ``flush``: queued, sealed (header, checksum), sent from the block's memory, acknowledged.
  kvtier copied put: the same with the block copied on the caller's thread, as a demotion (a host eviction)
  offers it: the slot is reused at once.
  kvtier get: ``submit_read`` of every block into block-sized host buffers, all
  in flight, each verified (header, key, lengths, checksum) before its future resolves.
- lookup: ``locate`` of 64 present keys, ``--lookups`` times: p50 / p99 latency and the requests it sent
  (one per node it touches: the round trips).
- offer: the caller's time in each ``offer`` of the put phase (``offer_p50_us`` / ``offer_p99_us``): what a
  put on the engine's thread pays for write-through (queueing a lent block, never a copy or the network).
Raw and kvtier phases of a kind run back to back and take turns going first; figures are medians over
``--repeats``. Every block read back is
compared with what was written: ``wrong_blocks`` must be 0 (the run fails otherwise).

Promises: ``--json`` prints one JSON list with one record per mode, each with at least ``mode``,
``remote_put_gbps``, ``remote_put_copied_gbps``, ``remote_get_gbps``, ``raw_put_gbps``, ``raw_get_gbps``, their
ratios ``put_vs_raw``, ``put_copied_vs_raw``, ``get_vs_raw``, ``lookup_p50_us``, ``lookup_p99_us``; gbps is
10**9 payload bytes per second. Servers it started are stopped at the end;
on configured servers it deletes only its own keys (a prefix of its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from kvtier.bench.common import gbps
from kvtier.config import RemoteConfig, StoreConfig
from kvtier.disk.format import HEADER_BYTES
from kvtier.layout import KVLayout
from kvtier.tiers.redis_client import RequestCounter, make_client
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.servers import LocalServers, start_cluster, start_single

HELP = "remote-tier put/get GB/s vs raw pipelined SET/GET with the same client; 64-key lookup latency"
_MiB = 1024 * 1024
_SOURCES = 8  # distinct payloads cycled through by the writes
_LOOKUP_KEYS = 64


def _layout(block_bytes: int) -> KVLayout:
    # 2 MiB: one 16-token block of Llama-3.1-8B in bf16 (32 layers x K/V x 8 heads x 128 dims).
    tokens = max(1, block_bytes // (32 * 2 * 8 * 128 * 2))
    return KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=tokens)


def _key(run: str, i: int) -> bytes:
    return f"{run}:{i:08d}".encode().rjust(16, b"-")[-16:]


def _raw_put(client: Any, keys: list[bytes], values: list[bytes], batch: int) -> float:
    started = time.perf_counter()
    for first in range(0, len(keys), batch):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + batch, len(keys))):
            pipe.set(keys[i], values[i % len(values)])
        if not all(reply is True for reply in pipe.execute()):
            raise RuntimeError("a raw SET failed")
    return time.perf_counter() - started


def _raw_get(client: Any, keys: list[bytes], batch: int) -> float:
    started = time.perf_counter()
    for first in range(0, len(keys), batch):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + batch, len(keys))):
            pipe.get(keys[i])
        if any(reply is None for reply in pipe.execute()):
            raise RuntimeError("a raw GET missed")
    return time.perf_counter() - started


def _tier_put(tier: RemoteTier, keys: list[bytes], sources: list[torch.Tensor], offer_us: list[float],
              lent: bool = True) -> float:
    before = int(tier.stats(0).detail["blocks_written"])
    started = time.perf_counter()
    released: list[int] = []
    for i, key in enumerate(keys):
        offered = time.perf_counter()
        # Lent, as the store's write-through lends a pinned host slot: sent from there, never copied.
        # Otherwise copied before offer returns, as a demotion's block.
        if not tier.offer(key, sources[i % len(sources)], release=(lambda: released.append(1)) if lent else None):
            raise RuntimeError("the tier refused a block (queue full or servers down)")
        if lent:
            offer_us.append((time.perf_counter() - offered) * 1e6)
    tier.flush()
    if lent and len(released) != len(keys):
        raise RuntimeError("a lent block was not released")
    seconds = time.perf_counter() - started
    if int(tier.stats(0).detail["blocks_written"]) - before != len(keys):
        raise RuntimeError("not every block was written")
    return seconds


def _tier_get(tier: RemoteTier, keys: list[bytes], sources: list[torch.Tensor],
              dsts: list[torch.Tensor]) -> tuple[float, int]:
    started = time.perf_counter()
    futures = [tier.submit_read(key, dst) for key, dst in zip(keys, dsts, strict=True)]
    ok = [future.result() for future in futures]
    seconds = time.perf_counter() - started
    wrong = sum(not hit or not torch.equal(dst, sources[i % len(sources)])
                for i, (hit, dst) in enumerate(zip(ok, dsts, strict=True)))
    return seconds, wrong


def _lookups(tier: RemoteTier, keys: list[bytes], count: int) -> tuple[list[float], float]:
    tier.locate(keys)  # warm: every node's connection open
    latencies: list[float] = []
    before = tier.requests.sent
    for _ in range(count):
        started = time.perf_counter()
        found = tier.locate(keys)
        latencies.append((time.perf_counter() - started) * 1e6)
        if not all(found):
            raise RuntimeError("a lookup missed a stored key")
    return latencies, (tier.requests.sent - before) / count


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def bench_mode(config: RemoteConfig, num_nodes: int, block_bytes: int, total_bytes: int, repeats: int,
               lookups: int) -> dict[str, Any]:
    layout = _layout(block_bytes)
    block_bytes = layout.block_bytes
    num_blocks = max(_LOOKUP_KEYS, total_bytes // block_bytes)
    run_id = os.urandom(3).hex()
    config = dataclasses.replace(config, key_prefix=f"{config.key_prefix}-bench-{run_id}",
                                 queue_bytes=max(config.queue_bytes, (num_blocks + 1) * (block_bytes + HEADER_BYTES)))
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=generator) for _ in range(_SOURCES)]
    values = [bytes(HEADER_BYTES) + source.numpy().tobytes() for source in sources]
    dsts = [torch.empty(block_bytes, dtype=torch.uint8) for _ in range(num_blocks)]
    batch = max(1, config.batch_bytes // (block_bytes + HEADER_BYTES))
    raw_client = make_client(config, RequestCounter())
    tier = RemoteTier(config, layout)
    if not tier.up:
        raise RuntimeError(f"cannot reach {list(config.urls)}")
    samples: dict[str, list[float]] = {name: [] for name in ("raw_put", "raw_get", "put", "put_copied", "get")}
    wrong = 0
    latencies: list[float] = []
    offer_us: list[float] = []
    requests_per_lookup = 0.0
    try:
        for repeat in range(repeats):
            raw_keys = [f"{config.key_prefix}:raw:{repeat}:{i}".encode() for i in range(num_blocks)]
            keys = [_key(f"{run_id}{repeat}", i) for i in range(num_blocks)]
            copied_keys = [_key(f"{run_id}c{repeat}", i) for i in range(num_blocks)]
            # Like phases run back to back and take turns going first: the machine's load drifts.
            first = repeat % 2 == 0
            for phase in ("raw_put", "put", "put_copied") if first else ("put_copied", "put", "raw_put"):
                if phase == "raw_put":
                    samples[phase].append(_raw_put(raw_client, raw_keys, values, batch))
                else:
                    lent = phase == "put"
                    samples[phase].append(_tier_put(tier, keys if lent else copied_keys, sources, offer_us, lent))
            for turn in (first, not first):
                if turn:
                    seconds, wrong_now = _tier_get(tier, keys, sources, dsts)
                    samples["get"].append(seconds)
                    wrong += wrong_now
                else:
                    samples["raw_get"].append(_raw_get(raw_client, raw_keys, batch))
            if repeat == 0:
                latencies, requests_per_lookup = _lookups(tier, keys[:_LOOKUP_KEYS], lookups)
            _delete(raw_client, raw_keys + [tier.server_key(key) for key in keys + copied_keys], batch * 8)
    finally:
        tier.close()
        raw_client.close()
    payload_bytes = num_blocks * block_bytes
    figures = {name: gbps(payload_bytes, statistics.median(times)) for name, times in samples.items()}
    record: dict[str, Any] = {
        "mode": config.mode, "nodes": num_nodes, "block_bytes": block_bytes, "blocks": num_blocks,
        "repeats": repeats, "remote_put_gbps": figures["put"], "remote_put_copied_gbps": figures["put_copied"],
        "remote_get_gbps": figures["get"], "raw_put_gbps": figures["raw_put"], "raw_get_gbps": figures["raw_get"],
        "put_vs_raw": round(figures["put"] / figures["raw_put"], 3),
        "put_copied_vs_raw": round(figures["put_copied"] / figures["raw_put"], 3),
        "get_vs_raw": round(figures["get"] / figures["raw_get"], 3),
        "lookup_keys": _LOOKUP_KEYS, "lookup_p50_us": _percentile(latencies, 0.5),
        "lookup_p99_us": _percentile(latencies, 0.99), "lookup_requests": round(requests_per_lookup, 2),
        "offer_p50_us": _percentile(offer_us, 0.5), "offer_p99_us": _percentile(offer_us, 0.99),
        "wrong_blocks": wrong, "unix_time": int(time.time()),
    }
    record["meets_targets"] = (record["put_vs_raw"] >= 0.8 and record["put_copied_vs_raw"] >= 0.8
                               and record["get_vs_raw"] >= 0.8
                               and record["lookup_requests"] <= num_nodes and wrong == 0)
    if wrong:
        raise RuntimeError(f"{wrong} blocks read back wrong: {record}")
    return record


def _delete(client: Any, keys: list[bytes], batch: int) -> None:
    for first in range(0, len(keys), batch):
        pipe = client.pipeline(transaction=False)
        for key in keys[first : first + batch]:
            pipe.delete(key)
        pipe.execute()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default="single,cluster",
                        help="modes to run on local servers (ignored when [remote] urls are configured)")
    parser.add_argument("--block-bytes", type=int, default=2 * _MiB,
                        help="block size (2 MiB: 16 tokens of Llama-3.1-8B in bf16)")
    parser.add_argument("--total-mib", type=int, default=128, help="MiB written and read per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=300, help="64-key lookups timed per mode")
    parser.add_argument("--json", action="store_true", help="print one JSON list of records, one per mode")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    records = []
    if config.remote.urls:
        runs: list[tuple[RemoteConfig, LocalServers | None]] = [(config.remote, None)]
    else:
        runs = []
        servers: LocalServers
        for mode in args.modes.split(","):
            servers = start_single() if mode == "single" else start_cluster(3)
            runs.append((dataclasses.replace(config.remote, urls=servers.urls, mode="cluster" if mode == "cluster"
                                             else "single"), servers))
    try:
        for remote, started in runs:
            nodes = len(started.nodes) if started is not None else len(remote.urls)
            records.append(bench_mode(remote, nodes, args.block_bytes, args.total_mib * _MiB, args.repeats,
                                      args.lookups))
    finally:
        for _, started in runs:
            if started is not None:
                started.stop()
    if args.json:
        print(json.dumps(records))
    for record in records:
        print(f"remote tier ({record['mode']}, {record['nodes']} node(s), {record['block_bytes']} B blocks): put "
              f"{record['remote_put_gbps']} GB/s (raw {record['raw_put_gbps']}, x{record['put_vs_raw']}), copied put "
              f"{record['remote_put_copied_gbps']} GB/s (x{record['put_copied_vs_raw']}), get "
              f"{record['remote_get_gbps']} GB/s (raw {record['raw_get_gbps']}, x{record['get_vs_raw']}); "
              f"64-key lookup p50 {record['lookup_p50_us']} us, p99 {record['lookup_p99_us']} us, "
              f"{record['lookup_requests']} requests", file=sys.stderr if args.json else sys.stdout)
    return 0
