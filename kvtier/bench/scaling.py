"""``kvtier bench scaling``: how the store's per-block costs grow with the blocks it holds and the prompt length.

Two sweeps, in one process, on the embedded store (host tier, CPU):
- Index size: the host tier filled with 10**3 ... 10**6 blocks payload-free (``reserve`` + ``commit``: the
  index and the eviction policy do their work, no byte is copied, so the arena's pages are never touched).
  At each size, the median time of a 64-key ``lookup`` (prefetch off), a 64-key payload-free put
  (``reserve`` + ``commit`` of fresh keys) and a 64-key payload-free get (``acquire`` + ``release``).
- Prompt length: 1k ... 128k tokens in 16-token blocks of 4 KiB (a small layout, so that the figures show
  the per-block bookkeeping, not memcpy): key derivation, ``lookup``, ``put`` and ``get`` of the whole
  prompt, with payloads.

Promises: fixed seeds; medians of ``repeats``; every figure also per block (microseconds). The record
holds one object per sweep (``index``: ``blocks`` and the costs aligned with it; ``prompt``: ``tokens``
and its costs), each with ``growth``: for each cost, per-block cost at the largest size / at the
smallest, and ``constant_per_block`` when that is below 2 (a cost that is O(1) per block stays flat; noise
on a shared machine moves it by tens of percent). Prints one JSON record (``--json``) or a table. A failed
put or get aborts with an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kvtier.bench.progress import track
from kvtier.config import HostConfig, StoreConfig
from kvtier.errors import KvtierError
from kvtier.layout import KVLayout
from kvtier.store import Store

HELP = "how lookup, put and get costs grow with blocks stored (10^3-10^6) and prompt length (1k-128k tokens)"
PROBE_BLOCKS = 64
FILL_BATCH = 4096
_CONSTANT_GROWTH = 2.0
_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, dtype="float16", block_tokens=16)  # 4 KiB blocks


def _keys(tag: str, start: int, count: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}-{i}".encode(), digest_size=16).digest() for i in range(start, start + count)]


def _median_us(run: Callable[[], object], repeats: int, setup: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        setup()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def _config(num_blocks: int) -> StoreConfig:
    # LRU: a put of fresh keys evicts the oldest blocks, never the ones it just wrote (S3-FIFO's small queue may).
    config = StoreConfig(host=HostConfig(capacity_bytes=num_blocks * 4096, pin=False, policy="lru"))
    return dataclasses.replace(config, transfer=dataclasses.replace(config.transfer, backend="cpu"))


def measure_index(num_blocks: int, repeats: int) -> dict[str, float]:
    """Per-64-key costs (us) with ``num_blocks`` blocks in the host tier's index."""
    with Store(_LAYOUT, _config(num_blocks + PROBE_BLOCKS * (repeats + 1))) as store:
        started = time.perf_counter()
        for start in range(0, num_blocks, FILL_BATCH):
            store.commit(store.reserve(_keys("fill", start, min(FILL_BATCH, num_blocks - start))))
        fill_s = time.perf_counter() - started
        # Probe keys spread over the whole index, so a cost that depends on a key's position shows.
        stride = max(1, num_blocks // PROBE_BLOCKS)
        probe = [_keys("fill", i, 1)[0] for i in range(0, num_blocks, stride)][:PROBE_BLOCKS]
        lookup_us = _median_us(lambda: store.lookup(probe, prefetch=False), repeats)
        fresh: list[bytes] = []
        rounds = iter(range(10**9))

        def new_keys() -> None:
            fresh[:] = _keys(f"put-{next(rounds)}", 0, PROBE_BLOCKS)

        put_us = _median_us(lambda: store.commit(store.reserve(fresh)), repeats, new_keys)
        get_us = _median_us(lambda: store.release(store.acquire(probe)), repeats)
        if store.lookup(probe, prefetch=False).num_blocks != len(probe):
            raise KvtierError("the scaling benchmark lost blocks of its index")
    n = len(probe)
    return {"fill_us_per_block": fill_s * 1e6 / num_blocks, "lookup_us_per_block": lookup_us / n,
            "put_us_per_block": put_us / PROBE_BLOCKS, "get_us_per_block": get_us / n}


def measure_prompt(prompt_tokens: int, repeats: int) -> dict[str, float]:
    """Whole-prompt costs (ms) of a ``prompt_tokens`` prompt: key derivation, lookup, put, get."""
    num_blocks = prompt_tokens // _LAYOUT.block_tokens
    generator = torch.Generator().manual_seed(prompt_tokens)
    blocks = [torch.randn(_LAYOUT.block_numel, generator=generator).to(torch.float16) for _ in range(num_blocks)]
    out = [torch.empty_like(block) for block in blocks]
    token_ids = torch.randint(0, 128_000, (prompt_tokens,), generator=generator).tolist()
    with Store(_LAYOUT, _config(2 * num_blocks)) as store:
        hasher = store.hasher("bench-scaling")
        derive_us = _median_us(lambda: hasher.keys(token_ids), repeats)
        keys: list[bytes] = []
        rounds = iter(range(10**9))

        def new_keys() -> None:
            # Fresh keys each repeat (a put of present keys is deduplicated, not copied); LRU drops old ones.
            keys[:] = hasher.keys([next(rounds) % 128_000, *token_ids[1:]])

        def put() -> None:
            if not store.put(keys, blocks).wait().ok:
                raise KvtierError("a put of the scaling benchmark failed")

        put_us = _median_us(put, repeats, new_keys)
        lookup_us = _median_us(lambda: store.lookup(keys, prefetch=False), repeats)

        def get() -> None:
            if not store.get(keys, out).wait().ok:
                raise KvtierError("a get of the scaling benchmark failed")

        get_us = _median_us(get, repeats)
    return {"key_derive_ms": derive_us / 1e3, "lookup_ms": lookup_us / 1e3, "put_ms": put_us / 1e3,
            "get_ms": get_us / 1e3, "key_derive_us_per_block": derive_us / num_blocks,
            "lookup_us_per_block": lookup_us / num_blocks, "put_us_per_block": put_us / num_blocks,
            "get_us_per_block": get_us / num_blocks}


def _growth(rows: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    verdicts: dict[str, dict[str, Any]] = {}
    for name in names:
        growth = rows[-1][name] / rows[0][name] if rows[0][name] > 0 else float("inf")
        verdicts[name] = {"growth": round(growth, 2), "constant_per_block": growth < _CONSTANT_GROWTH}
    return verdicts


def run_scaling(index_blocks: list[int], prompt_tokens: list[int], repeats: int) -> dict[str, Any]:
    """The JSON record: both sweeps, their per-block costs and growth verdicts."""
    index_rows = [measure_index(n, repeats) for n in track(index_blocks, "scaling: index size")]
    prompt_rows = [measure_prompt(n, repeats) for n in track(prompt_tokens, "scaling: prompt length")]
    index: dict[str, Any] = {"blocks": index_blocks}
    index.update({name: [round(row[name], 3) for row in index_rows] for name in index_rows[0]})
    index["growth"] = _growth(index_rows, ("lookup_us_per_block", "put_us_per_block", "get_us_per_block"))
    prompt: dict[str, Any] = {"tokens": prompt_tokens}
    prompt.update({name: [round(row[name], 3) for row in prompt_rows] for name in prompt_rows[0]})
    prompt["growth"] = _growth(prompt_rows, ("key_derive_us_per_block", "lookup_us_per_block", "put_us_per_block",
                                             "get_us_per_block"))
    record: dict[str, Any] = {"benchmark": "scaling", "block_bytes": _LAYOUT.block_bytes,
                              "probe_blocks": PROBE_BLOCKS, "repeats": repeats, "index": index, "prompt": prompt}
    record["torch_threads"] = torch.get_num_threads()
    record["unix_time"] = int(time.time())
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-blocks", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6],
                        help="blocks in the index at each step of the first sweep")
    parser.add_argument("--prompt-tokens", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
                        help="prompt lengths of the second sweep")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few seconds)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    if args.quick:
        index_blocks, prompt_tokens, repeats = [10**3, 10**4, 10**5, 10**6], [1024, 8192, 32768, 131072], 5
    else:
        index_blocks, prompt_tokens, repeats = args.index_blocks, args.prompt_tokens, args.repeats
    record = run_scaling(index_blocks, prompt_tokens, repeats)
    if args.json:
        print(json.dumps(record))
        return 0
    index, prompt = record["index"], record["prompt"]
    print(f"{'blocks stored':>14} {'lookup us/blk':>14} {'put us/blk':>11} {'get us/blk':>11}")
    for i, blocks in enumerate(index["blocks"]):
        print(f"{blocks:>14} {index['lookup_us_per_block'][i]:>14} {index['put_us_per_block'][i]:>11} "
              f"{index['get_us_per_block'][i]:>11}")
    print(f"{'prompt tokens':>14} {'keys us/blk':>12} {'lookup us/blk':>14} {'put us/blk':>11} {'get us/blk':>11}")
    for i, tokens in enumerate(prompt["tokens"]):
        print(f"{tokens:>14} {prompt['key_derive_us_per_block'][i]:>12} {prompt['lookup_us_per_block'][i]:>14} "
              f"{prompt['put_us_per_block'][i]:>11} {prompt['get_us_per_block'][i]:>11}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/scaling.py``: parse ``argv`` and run with the default configuration."""
    parser = argparse.ArgumentParser(prog="kvtier bench scaling", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())
