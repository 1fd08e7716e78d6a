"""``kvtier bench host``: host-tier put/get against raw copies of the same bytes, per call and in batches.

Baselines, measured in the same run (``kvtier.bench.rawcopy``): ``memcpy_gbps``, a single-threaded copy,
``memcpy_threads_gbps``, the same bytes cut across as many threads as the store's transfer workers (the
caller copying one part), and ``torch_copy_gbps``, ``Tensor.copy_`` with torch's intra-op pool set to that
many threads. Every ``*_vs_memcpy`` ratio is against the best of the three, so a ratio near 1 means kvtier
copies as fast as the machine does with its threads; ``*_vs_memcpy_1t`` is against the single-threaded
copy alone.

- Batches: for each block size, ``Store.put`` of fresh keys and ``Store.get`` back into caller tensors, one
  call for the whole batch. The arena is written once before timing, so page faults of a fresh mapping are
  not counted there.
- Per call (``per_call``): one chunk per call, as a connector moves one request's new block, for a
  Llama-3.2-1B-like chunk (16 layers x 8 KV heads x 64 dims, bf16, 256 tokens: 8 MiB) and a 7B-like one
  (32 x 8 x 128: 32 MiB): the median milliseconds of ``put([key], [chunk]).wait()`` (fresh keys, derived
  before the timing) and of ``get``, against both raw copies of one chunk, in rounds that take turns going
  first (the load drifts). A put's raw copies (``raw_put_*``) write chunk buffers in turn, as many as the
  slots its puts cycle through, so that both write memory no call wrote recently; a get's (``raw_*``) copy
  between the same four chunks the gets read, as warm in the caches as those. Each is timed three ways
  (1 thread, N memmove threads, torch's ``copy_`` on N threads); ratios are against the fastest.
- First fill (``first_fill_*``): a new store of ``--first-fill-mib`` filled with 1 MiB blocks once its
  background prefault finished (``first_fill``; ``first_fill_prefault_s`` is how long the prefault took
  from opening), right as it opens, racing the prefault (``first_fill_at_open``), and with no prefault
  (``first_fill_no_prefault``), each against a memcpy of the same bytes into memory already touched.
- Keys: the cost of deriving and looking up the keys of an 8,192-block prompt (128k tokens at 16 tokens
  per block).

Prints one JSON object (``--json``) or a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from kvtier.bench.common import gbps, median_seconds
from kvtier.bench.rawcopy import RawCopier, TorchCopier
from kvtier.config import HostConfig, StoreConfig, TransferConfig
from kvtier.layout import KVLayout
from kvtier.store import Store

HELP = "host-tier put/get vs raw copies (1 and N threads), per call and in batches; key derivation, lookup"
_MiB = 1024 * 1024
# One chunk of 256 tokens of one shard, bf16: Llama-3.2-1B-like (8 MiB) and 7B-like with GQA (32 MiB).
PER_CALL_LAYOUTS = {
    "1b": KVLayout(num_layers=16, num_kv_heads=8, head_dim=64, dtype="bfloat16", block_tokens=256),
    "7b": KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=256),
}


def _layout_for(block_bytes: int) -> KVLayout:
    # float16, 8 KV heads x 128 dims x 16 tokens x K/V is 64 KiB a layer: block size = 64 KiB x layers.
    return KVLayout(num_layers=max(1, block_bytes // (64 * 1024)), num_kv_heads=8, head_dim=128,
                    dtype="float16", block_tokens=16)


def measure_copies(block_bytes: int, total_bytes: int, repeats: int, num_workers: int) -> dict[str, float]:
    layout = _layout_for(block_bytes)
    num_blocks = max(1, total_bytes // layout.block_bytes)
    sources = [torch.randn(layout.block_numel).to(torch.float16) for _ in range(num_blocks)]
    outputs = [torch.empty_like(src) for src in sources]

    with RawCopier(1) as single, RawCopier(num_workers) as threaded, TorchCopier(num_workers) as pooled:
        single.copy(outputs, sources)  # touch the destination pages, as the arena's are below
        memcpy_s = median_seconds(lambda: single.copy(outputs, sources), repeats)
        threads_s = median_seconds(lambda: threaded.copy(outputs, sources), repeats)
        torch_s = median_seconds(lambda: pooled.copy(outputs, sources), repeats)
    config = StoreConfig(host=HostConfig(capacity_bytes=2 * num_blocks * layout.block_bytes + 4096 * num_blocks),
                         transfer=TransferConfig(backend="cpu", num_workers=num_workers))
    with Store(layout, config) as store:
        hasher = store.hasher("bench-host")
        rounds = iter(range(10**9))
        keys: list[bytes] = []

        def new_keys() -> None:
            keys[:] = hasher.keys([next(rounds)] * (num_blocks * layout.block_tokens))

        def put() -> None:
            store.put(keys, sources).wait()

        for _ in range(2):  # touch every arena page once
            new_keys()
            put()
        put_s = median_seconds(put, repeats, setup=new_keys)
        get_s = median_seconds(lambda: store.get(keys, outputs).wait(), repeats)
        if store.stats().put_failed_blocks or store.stats().get_failed_blocks:
            raise RuntimeError("the host benchmark lost blocks: the arena is too small for its working set")
    moved = num_blocks * layout.block_bytes
    return {"memcpy_gbps": gbps(moved, memcpy_s), "memcpy_threads_gbps": gbps(moved, threads_s),
            "torch_copy_gbps": gbps(moved, torch_s), "host_put_gbps": gbps(moved, put_s),
            "host_get_gbps": gbps(moved, get_s)}


# The raw copies of a get's chunk and of a put's (into cold buffers): 1 thread, N memmove threads, torch on N.
_RAW_GET = ("raw_1t", "raw_threads", "raw_torch")
_RAW_PUT = ("raw_put_1t", "raw_put_threads", "raw_put_torch")


class PerCallPeer(Protocol):
    """Another cache's one-chunk put and get, timed beside kvtier's (``kvtier.bench.peers_calls``)."""

    def put(self, chunk: torch.Tensor) -> object:
        """Store a copy of ``chunk`` under a fresh key; the handle to read it back by."""

    def get(self, handle: object, out: torch.Tensor) -> None:
        """Copy the chunk stored under ``handle`` into ``out`` (raise if it is gone)."""


def measure_per_call(layout: KVLayout, rounds: int, calls: int, num_workers: int,
                     peers: Mapping[str, PerCallPeer] | None = None) -> dict[str, float]:
    """Median ms of one-chunk puts and gets, and of one chunk's raw copies, interleaved in ``rounds``; the same
    for each of ``peers`` (``<name>_put_ms``, ``<name>_get_ms``, and kvtier's against them), read back and
    compared byte for byte like kvtier's."""
    peers = dict(peers or {})
    num_sources = 4
    sources = [torch.randn(layout.block_numel).to(layout.torch_dtype) for _ in range(num_sources)]
    outputs = [torch.empty_like(src) for src in sources]
    # A put writes a slot no call wrote recently (its puts cycle through the store's other slots), a get reads
    # one of the chunks read back: the put's raw copy writes a sink in turn, as many as those slots, the get's
    # writes ``outputs`` (four chunks, partly in the CPU's last-level cache, as the chunks a get reads are).
    sinks = [torch.empty_like(sources[0]) for _ in range(2 * calls + 2)]
    sink_turns = itertools.count()
    # LRU with room for the chunks read back and two rounds of fresh puts (rounds take turns going first, so two
    # put rounds may fall between two get rounds): the chunks read back are never evicted.
    config = StoreConfig(host=HostConfig(capacity_bytes=(2 * calls + num_sources + 2) * (layout.block_bytes + 4096),
                                         policy="lru"),
                         transfer=TransferConfig(backend="cpu", num_workers=num_workers))
    times: dict[str, list[float]] = {name: [] for name in (*_RAW_GET, *_RAW_PUT, "put", "get",
                                                           *(f"{p}_{op}" for p in peers for op in ("put", "get")))}
    with (Store(layout, config) as store, RawCopier(1) as single, RawCopier(num_workers) as threaded,
          TorchCopier(num_workers) as pooled):
        store.arena.wait_prepared()
        hasher = store.hasher("bench-per-call")
        # Keys derived before the timing, as a connector has them from its lookup: a put is timed, not a hash.
        num_puts = (rounds + 2) * calls + 3 * num_sources
        fresh = iter(hasher.keys(np.arange(num_puts * layout.block_tokens, dtype=np.int64)))

        def put(i: int) -> bytes:
            key = next(fresh)
            if not store.put([key], [sources[i % num_sources]]).wait().ok:
                raise RuntimeError("the per-call benchmark lost a put")
            return key

        resident = [put(i) for i in range(num_sources)]  # resident[i] holds sources[i]: the chunks read back

        def get(i: int) -> None:
            if not store.get([resident[i % num_sources]], [outputs[i % num_sources]]).wait().ok:
                raise RuntimeError("the per-call benchmark lost a get")

        steps: dict[str, Callable[[int], object]] = {
            "raw_1t": lambda i: single.copy([outputs[i % num_sources]], [sources[i % num_sources]]),
            "raw_threads": lambda i: threaded.copy([outputs[i % num_sources]], [sources[i % num_sources]]),
            "raw_torch": lambda i: pooled.copy([outputs[i % num_sources]], [sources[i % num_sources]]),
            "raw_put_1t": lambda i: single.copy([sinks[next(sink_turns) % len(sinks)]], [sources[i % num_sources]]),
            "raw_put_threads": lambda i: threaded.copy([sinks[next(sink_turns) % len(sinks)]],
                                                       [sources[i % num_sources]]),
            "raw_put_torch": lambda i: pooled.copy([sinks[next(sink_turns) % len(sinks)]], [sources[i % num_sources]]),
            "put": put, "get": get}
        peer_resident = {name: [peer.put(source) for source in sources] for name, peer in peers.items()}
        for name, peer in peers.items():
            steps[f"{name}_put"] = lambda i, peer=peer: peer.put(sources[i % num_sources])  # type: ignore[misc]
            steps[f"{name}_get"] = (lambda i, peer=peer, held=peer_resident[name]:  # type: ignore[misc]
                                    peer.get(held[i % num_sources], outputs[i % num_sources]))
        for i in range(2 * num_sources):  # touch every page of the sources, outputs and the first slots
            for step in steps.values():
                step(i)
        order = list(steps)
        for r in range(rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:
                for i in range(calls):
                    start = time.perf_counter()
                    steps[name](i)
                    times[name].append(time.perf_counter() - start)
        for key, source in zip(resident, sources, strict=True):
            out = torch.empty_like(source)
            if not (store.get([key], [out]).wait().ok and torch.equal(out, source)):
                raise RuntimeError("the per-call benchmark read back other bytes")
        for name, peer in peers.items():
            for handle, source in zip(peer_resident[name], sources, strict=True):
                out = torch.empty_like(source)
                peer.get(handle, out)
                if not torch.equal(out, source):
                    raise RuntimeError(f"the per-call benchmark read other bytes back from {name}")
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    best = min(ms[name] for name in _RAW_GET)
    best_put = min(ms[name] for name in _RAW_PUT)
    result = {"chunk_bytes": layout.block_bytes,
              **{f"{name}_ms": round(ms[name], 3) for name in (*_RAW_GET, *_RAW_PUT, "put", "get")},
              "put_vs_raw": round(ms["put"] / best_put, 3), "get_vs_raw": round(ms["get"] / best, 3),
              "put_vs_raw_1t": round(ms["put"] / ms["raw_put_1t"], 3),
              "get_vs_raw_1t": round(ms["get"] / ms["raw_1t"], 3)}
    for name in peers:
        for op in ("put", "get"):
            result[f"{name}_{op}_ms"] = round(ms[f"{name}_{op}"], 3)
            result[f"{name}_{op}_vs_raw"] = round(ms[f"{name}_{op}"] / (best_put if op == "put" else best), 3)
            result[f"{op}_vs_{name}"] = round(ms[op] / ms[f"{name}_{op}"], 3)
    return result


def measure_first_fill(fill_bytes: int, num_workers: int, prefault: bool, repeats: int,
                       wait_prefault: bool = False) -> dict[str, float]:
    """GB/s of filling a fresh store (1 MiB blocks), and of a memcpy into touched memory.

    The fill starts as soon as the store opened, or (``wait_prefault``) once its background prefault ended.
    """
    layout = _layout_for(_MiB)
    num_blocks = max(1, fill_bytes // layout.block_bytes)
    # A few source blocks reused: the sources stay small, every key (and so every slot) is new.
    sources = [torch.randn(layout.block_numel).to(torch.float16) for _ in range(min(num_blocks, 64))]
    blocks = [sources[i % len(sources)] for i in range(num_blocks)]
    warm = np.zeros((min(num_blocks, 256), layout.block_bytes), dtype=np.uint8)
    source_bytes = [src.view(torch.uint8).numpy() for src in sources]

    def raw_copy() -> None:
        for i in range(num_blocks):
            np.copyto(warm[i % len(warm)], source_bytes[i % len(source_bytes)])

    raw_copy()
    memcpy_s = median_seconds(raw_copy, repeats)
    config = StoreConfig(host=HostConfig(capacity_bytes=num_blocks * layout.block_bytes, prefault=prefault),
                         transfer=TransferConfig(backend="cpu", num_workers=num_workers))
    opened = time.perf_counter()
    with Store(layout, config) as store:
        keys = store.hasher("bench-first-fill").keys([0] * (num_blocks * layout.block_tokens))
        if wait_prefault:
            store.arena.wait_prepared()
        prefault_s = time.perf_counter() - opened
        started = time.perf_counter()
        if not store.put(keys, blocks).wait().ok:
            raise RuntimeError("the first-fill benchmark lost blocks")
        fill_s = time.perf_counter() - started
    moved = num_blocks * layout.block_bytes
    return {"memcpy_gbps": gbps(moved, memcpy_s), "fill_gbps": gbps(moved, fill_s), "prefault_s": prefault_s}


def measure_keys(num_blocks: int, block_tokens: int, repeats: int) -> dict[str, float]:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, dtype="float16", block_tokens=block_tokens)
    token_ids = [(i * 7919) % 128_000 for i in range(num_blocks * block_tokens)]
    config = StoreConfig(host=HostConfig(capacity_bytes=num_blocks * 4096))
    with Store(layout, config) as store:
        hasher = store.hasher("bench-keys")
        derive_s = median_seconds(lambda: hasher.keys(token_ids), repeats)
        keys = hasher.keys(token_ids)
        blocks = [torch.zeros(layout.block_numel, dtype=torch.float16)] * num_blocks
        store.put(keys, blocks).wait()
        lookup_s = median_seconds(lambda: store.lookup(keys), repeats)
        hit = store.lookup(keys).num_blocks
    return {"prompt_tokens": num_blocks * block_tokens, "prompt_blocks": num_blocks, "lookup_hit_blocks": hit,
            "key_derive_ms": round(derive_s * 1e3, 3), "lookup_ms": round(lookup_s * 1e3, 3),
            "key_derive_us_per_block": round(derive_s * 1e6 / num_blocks, 3),
            "lookup_us_per_block": round(lookup_s * 1e6 / num_blocks, 3)}


def run_host_bench(block_sizes: list[int], total_bytes: int, repeats: int, num_workers: int = 2,
                   prompt_blocks: int = 8192, first_fill_bytes: int = 0, per_call_rounds: int = 0,
                   per_call_calls: int = 10, per_call_layouts: Sequence[str] = tuple(PER_CALL_LAYOUTS)
                   ) -> dict[str, object]:
    copies = [measure_copies(size, total_bytes, repeats, num_workers) for size in block_sizes]
    result: dict[str, object] = {
        "benchmark": "host",
        "block_bytes": [_layout_for(size).block_bytes for size in block_sizes],
        "total_bytes_per_size": total_bytes,
        "repeats": repeats,
        "transfer_workers": num_workers,
        **{name: [row[name] for row in copies]
           for name in ("host_put_gbps", "host_get_gbps", "memcpy_gbps", "memcpy_threads_gbps", "torch_copy_gbps")},
    }
    for op in ("put", "get"):
        result[f"{op}_vs_memcpy"] = [round(row[f"host_{op}_gbps"] / max(
            row["memcpy_gbps"], row["memcpy_threads_gbps"], row["torch_copy_gbps"]), 3) for row in copies]
        result[f"{op}_vs_memcpy_1t"] = [round(row[f"host_{op}_gbps"] / row["memcpy_gbps"], 3) for row in copies]
    for name in per_call_layouts if per_call_rounds else ():
        row = measure_per_call(PER_CALL_LAYOUTS[name], per_call_rounds, per_call_calls, num_workers)
        result.update({f"per_call_{name}_{field}": value for field, value in row.items()})
    if first_fill_bytes:
        prefaulted = measure_first_fill(first_fill_bytes, num_workers, True, repeats, wait_prefault=True)
        racing = measure_first_fill(first_fill_bytes, num_workers, True, repeats)
        faulting = measure_first_fill(first_fill_bytes, num_workers, False, repeats)
        result["first_fill_bytes"] = first_fill_bytes
        result["first_fill_prefault_s"] = round(prefaulted["prefault_s"], 3)
        for name, row in (("first_fill", prefaulted), ("first_fill_at_open", racing),
                          ("first_fill_no_prefault", faulting)):
            result[f"{name}_memcpy_gbps"] = row["memcpy_gbps"]
            result[f"{name}_gbps"] = row["fill_gbps"]
            result[f"{name}_vs_memcpy"] = round(row["fill_gbps"] / row["memcpy_gbps"], 3)
    result.update(measure_keys(prompt_blocks, 16, repeats))
    result["torch_threads"] = torch.get_num_threads()
    result["unix_time"] = int(time.time())
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-bytes", type=int, nargs="+", default=[64 * 1024, 256 * 1024, _MiB, 4 * _MiB],
                        help="block sizes to measure (rounded to whole 64 KiB layers)")
    parser.add_argument("--total-mib", type=int, default=256, help="MiB copied per block size and repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2, help="CPU transfer workers")
    parser.add_argument("--first-fill-mib", type=int, default=2048,
                        help="size of the fresh arena whose first fill is timed (0: skip)")
    parser.add_argument("--per-call-rounds", type=int, default=5,
                        help="rounds of one-chunk calls per method, taking turns going first (0: skip)")
    parser.add_argument("--per-call-calls", type=int, default=10, help="one-chunk calls per method and round")
    parser.add_argument("--per-call-layouts", nargs="+", choices=sorted(PER_CALL_LAYOUTS),
                        default=list(PER_CALL_LAYOUTS), help="chunk layouts of the per-call figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    result = run_host_bench(args.block_bytes, args.total_mib * _MiB, args.repeats, args.workers,
                            first_fill_bytes=args.first_fill_mib * _MiB, per_call_rounds=args.per_call_rounds,
                            per_call_calls=args.per_call_calls, per_call_layouts=args.per_call_layouts)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'block':>10} {'raw 1t GB/s':>12} {'raw Nt GB/s':>12} {'torch GB/s':>11} {'put GB/s':>10} {'get GB/s':>10} "
          f"{'put/raw':>8} {'get/raw':>8}")
    rows = zip(result["block_bytes"], result["memcpy_gbps"], result["memcpy_threads_gbps"],  # type: ignore[call-overload]
               result["torch_copy_gbps"], result["host_put_gbps"], result["host_get_gbps"], result["put_vs_memcpy"],
               result["get_vs_memcpy"], strict=True)
    for size, raw, raw_threads, pooled, put, get, put_ratio, get_ratio in rows:
        print(f"{size:>10} {raw:>12} {raw_threads:>12} {pooled:>11} {put:>10} {get:>10} {put_ratio:>8} {get_ratio:>8}")
    if "first_fill_gbps" in result:
        print(f"first fill of a fresh arena: {result['first_fill_gbps']} GB/s ({result['first_fill_vs_memcpy']}x "
              f"memcpy; {result['first_fill_at_open_vs_memcpy']}x racing the prefault, "
              f"{result['first_fill_no_prefault_vs_memcpy']}x without it)")
    for name in args.per_call_layouts if args.per_call_rounds else ():
        row = {field: result[f"per_call_{name}_{field}"] for field in (
            "chunk_bytes", "raw_1t_ms", "raw_threads_ms", "raw_torch_ms", "raw_put_1t_ms", "raw_put_threads_ms",
            "raw_put_torch_ms", "put_ms", "get_ms", "put_vs_raw", "get_vs_raw")}
        print(f"one {name} chunk ({row['chunk_bytes']} B) per call: put {row['put_ms']} ms (raw "
              f"{row['raw_put_1t_ms']} / {row['raw_put_threads_ms']} / {row['raw_put_torch_ms']} ms: 1 thread, "
              f"{args.workers} threads, torch: {row['put_vs_raw']}x), get {row['get_ms']} ms (raw {row['raw_1t_ms']} / "
              f"{row['raw_threads_ms']} / {row['raw_torch_ms']} ms: {row['get_vs_raw']}x the best raw copy)")
    print(f"keys of {result['prompt_tokens']} tokens: derive {result['key_derive_ms']} ms, "
          f"lookup {result['lookup_ms']} ms")
    return 0
