"""Store put/get with device tensors against raw pinned copies of the same blocks, in the same run.

What ``make gpu-check`` measures for the store (``store`` in its summary):

- ``raw_d2h_gbps`` / ``raw_h2d_gbps``: one ``copy_(non_blocking=True)`` per block between the device blocks
  and a pinned host buffer, one stream, synchronised at the end (the link's practical rate);
- ``put_gbps`` / ``get_gbps``: ``Store.put`` of fresh keys / ``Store.get`` back into device tensors, waited
  for, with the arena fully registered first (as a long-running store is);
- ``restore8_p50_ms``: the median time of an 8-block ``get`` and ``restore8_vs_link``, that time over
  what the link needs for the same bytes at ``raw_h2d_gbps``.
On a machine without CUDA the same code runs with CPU tensors (a plain copy as the baseline), which is how
the tests check it. Every figure is a median of ``repeats`` runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from kvtier.bench.common import gbps, median_seconds
from kvtier.config import HostConfig, StoreConfig, TransferConfig
from kvtier.layout import KVLayout
from kvtier.store import Store

_MiB = 1024 * 1024
RESTORE_BLOCKS = 8


def _layout_for(block_bytes: int) -> KVLayout:
    # float16, 8 KV heads x 128 dims x 16 tokens x K/V is 64 KiB a layer: block size = 64 KiB x layers.
    return KVLayout(num_layers=max(1, block_bytes // (64 * 1024)), num_kv_heads=8, head_dim=128,
                    dtype="float16", block_tokens=16)


def run_device_store_bench(device: str = "cuda", block_bytes: int = 2 * _MiB, total_bytes: int = 1024 * _MiB,
                           repeats: int = 5, restore_repeats: int = 50) -> dict[str, object]:
    """Store put/get GB/s of ``total_bytes`` in ``block_bytes`` blocks on ``device`` vs raw copies."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    layout = _layout_for(block_bytes)
    num_blocks = max(RESTORE_BLOCKS, total_bytes // layout.block_bytes)
    blocks = torch.randn(num_blocks, layout.block_numel, device=dev).to(torch.float16)
    outputs = torch.empty_like(blocks)
    host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=on_cuda)

    def synced(run: Callable[[], object]) -> Callable[[], None]:
        def timed() -> None:
            run()
            if on_cuda:
                torch.cuda.synchronize(dev)
        return timed

    def raw_d2h() -> None:
        for i in range(num_blocks):
            host[i].copy_(blocks[i], non_blocking=on_cuda)

    def raw_h2d() -> None:
        for i in range(num_blocks):
            outputs[i].copy_(host[i], non_blocking=on_cuda)

    config = StoreConfig(host=HostConfig(capacity_bytes=2 * num_blocks * (layout.block_bytes + 4096)),
                         transfer=TransferConfig(backend="cuda" if on_cuda else "cpu"))
    sources = list(blocks.unbind())
    dests = list(outputs.unbind())
    with Store(layout, config) as store:
        store.arena.wait_prepared()
        if on_cuda:
            store.pin_for(blocks.device)
            store.arena.wait_pinned()
        hasher = store.hasher("bench-device")
        rounds = iter(range(10**9))
        keys: list[bytes] = []

        def new_keys() -> None:
            keys[:] = hasher.keys([next(rounds)] * (num_blocks * layout.block_tokens))

        def put() -> None:
            if not store.put(keys, sources).wait().ok:
                raise RuntimeError("the device store benchmark lost blocks on put")

        def get() -> None:
            if not store.get(keys, dests).wait().ok:
                raise RuntimeError("the device store benchmark lost blocks on get")

        new_keys()
        for run in (synced(raw_d2h), synced(raw_h2d), put, get):  # warm up: registration, kernel compilation
            run()
        raw_d2h_s = median_seconds(synced(raw_d2h), repeats)
        raw_h2d_s = median_seconds(synced(raw_h2d), repeats)
        put_s = median_seconds(put, repeats, setup=new_keys)
        get_s = median_seconds(get, repeats)
        restore_keys, restore_dests = keys[:RESTORE_BLOCKS], dests[:RESTORE_BLOCKS]
        restore_times: list[float] = []
        for _ in range(restore_repeats):
            started = time.perf_counter()
            store.get(restore_keys, restore_dests).wait()
            restore_times.append(time.perf_counter() - started)
        identical = torch.equal(outputs, blocks)
        pinned_bytes = store.arena.pinned_bytes
    moved = num_blocks * layout.block_bytes
    restore_s = statistics.median(restore_times)
    link_s = RESTORE_BLOCKS * layout.block_bytes / (moved / raw_h2d_s)
    return {
        "benchmark": "device_store",
        "device": torch.cuda.get_device_name(dev) if on_cuda else "cpu",
        "block_bytes": layout.block_bytes,
        "num_blocks": num_blocks,
        "repeats": repeats,
        "arena_pinned_bytes": pinned_bytes,
        "raw_d2h_gbps": gbps(moved, raw_d2h_s),
        "raw_h2d_gbps": gbps(moved, raw_h2d_s),
        "put_gbps": gbps(moved, put_s),
        "get_gbps": gbps(moved, get_s),
        "put_vs_raw": round(raw_d2h_s / put_s, 3),
        "get_vs_raw": round(raw_h2d_s / get_s, 3),
        "restore8_p50_ms": round(restore_s * 1e3, 3),
        "restore8_link_ms": round(link_s * 1e3, 3),
        "restore8_vs_link": round(restore_s / link_s, 3),
        "get_identical": identical,
        "unix_time": int(time.time()),
    }
