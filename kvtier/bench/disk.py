"""``kvtier bench disk``: disk-tier write, read and restore GB/s against raw O_DIRECT I/O on the same filesystem.

Each repeat, in a fresh directory under ``path`` (tier and raw take turns going first; the raw run with the
tier's threads is always the one next to the tier's, so a pair runs back to back whatever the order):
- raw write: O_DIRECT ``pwritev`` of the same bytes to a new preallocated file (as the tier's data file is),
  then fdatasync, two ways: ``io_threads`` threads of 8 MiB I/Os (the size the tier streams a filling region
  in), which ``write_vs_raw`` compares against (the best plain writes did here with that many threads), and
  one thread of region-sized I/Os beside it (``raw_write_1t_gbps``, ``write_vs_raw_1t``).
- raw read: O_DIRECT ``preadv`` of block-sized I/Os of that file, ``io_threads`` at a time (``read_vs_raw``:
  the tier reads with as many in flight) and one at a time beside it (``raw_read_1t_gbps``,
  ``read_vs_raw_1t``). Every raw I/O moves from and into page-aligned memory; the figures count
  ``total_bytes``.
- kvtier write: ``offer`` of ``total_bytes`` of blocks, then ``flush`` (written, synced and indexed).
- kvtier read: ``submit_read`` of every block, ``2 * io_threads`` in flight (the tier's ``io_threads`` I/O
  threads never wait for the caller), into page-aligned host slots, after
  ``flush`` put every region on the drive (no read is served from a write buffer).
- restore: the same, then each host slot copied into a caller tensor (disk -> host slot -> caller) by a
  single-threaded memcpy: torch's intra-op threads spin while copying and took both cores from the I/O
  threads here (restore fell to half the read rate).
- per call: one block per call, nothing else in flight: ``read_into`` of a block against an O_DIRECT
  ``preadv`` of the same number of bytes from the raw file, taking turns (``per_call_read_ms`` /
  ``per_call_raw_read_ms``, medians over the calls of every repeat).

Then, once, the lookup of a 64-block prefix through a ``Store`` with a disk tier (``lookup_prefix_blocks``):
the median microseconds of ``lookup(keys, prefetch=False)`` with the blocks in the host tier
(``lookup_host_us``) and with them only on disk (``lookup_disk_us``, host evicted), same store, same keys:
the disk index answers from memory, so the ratio ``lookup_disk_vs_host`` is the cost of asking it.
Figures are medians over ``repeats``, ratios medians of per-repeat ratios; ``gbps`` counts payload
bytes (10**9 bytes per second). Where the filesystem has no O_DIRECT, both sides use buffered I/O,
``direct_io`` is false and the figures measure the page cache, not the drive.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from kvtier.bench.common import gbps, median_seconds
from kvtier.config import DiskConfig, HostConfig, StoreConfig
from kvtier.disk import DiskTier, aligned_tensor, supports_direct_io
from kvtier.disk.device import aligned_buffer
from kvtier.disk.format import entry_bytes
from kvtier.layout import KVLayout
from kvtier.store import Store

HELP = "disk-tier write/read/restore GB/s vs raw O_DIRECT sequential I/O on the same filesystem"
_MiB = 1024 * 1024
_SOURCES = 8  # distinct payloads cycled through by the writes
# The raw write size with ``io_threads`` in flight: the size the tier writes a filling region in
# (``kvtier.disk.tier._STREAM_BYTES``).
_RAW_WRITE_IO_BYTES = 8 * _MiB
_READS_IN_FLIGHT_PER_THREAD = 2
_PER_CALL_READS = 16  # one-block reads per repeat, each side
_LOOKUP_BLOCKS = 64


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _raw_io(path: str, total_bytes: int, io_bytes: int, threads: int, direct: bool, write: bool) -> float:
    """Seconds to write (then fdatasync) or read ``total_bytes`` of ``path`` in ``io_bytes`` I/Os, ``threads``
    at a time: thread ``i`` (the caller's is thread 0) moves I/Os ``i, i + threads, ...`` from its own
    page-aligned buffer, so the file is covered front to back with ``threads`` I/Os in flight (one thread:
    plain sequential I/O). A write goes to a new file, preallocated (untimed) as the tier's data file is:
    overwriting blocks already written skips the filesystem's extent conversion and would flatter raw.
    """
    if write:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    io_bytes = min(io_bytes, total_bytes)
    buffers = [memoryview(aligned_buffer(io_bytes, populate=True)) for _ in range(threads)]
    if write:
        for buffer in buffers:
            buffer[:] = os.urandom(io_bytes)
    offsets = range(0, total_bytes, io_bytes)
    fd = os.open(path, (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY) | (os.O_DIRECT if direct else 0), 0o600)
    try:
        if write:
            os.posix_fallocate(fd, 0, total_bytes)
        call = os.pwritev if write else os.preadv

        def move(i: int) -> None:
            for offset in offsets[i::threads]:
                call(fd, [buffers[i][: total_bytes - offset]], offset)

        helpers = [threading.Thread(target=move, args=(i,)) for i in range(1, threads)]

        def run() -> None:
            for helper in helpers:
                helper.start()
            move(0)  # the caller's thread moves its share too, as in a plain sequential loop
            for helper in helpers:
                helper.join()
            if write:
                os.fdatasync(fd)

        return _timed(run)
    finally:
        os.close(fd)


def _read_all(tier: DiskTier, keys: list[bytes], slots: list[torch.Tensor],
              finish: Callable[[torch.Tensor], object]) -> None:
    """Read every key with ``len(slots)`` reads in flight; ``finish(slot)`` after each one."""
    free = deque(slots)
    in_flight: deque[tuple[Future[bool], torch.Tensor]] = deque()
    for key in keys:
        if not free:
            future, slot = in_flight.popleft()
            if not future.result():
                raise RuntimeError("the disk benchmark lost a block")
            finish(slot)
            free.append(slot)
        slot = free.popleft()
        in_flight.append((tier.submit_read(key, slot), slot))
    for future, slot in in_flight:
        if not future.result():
            raise RuntimeError("the disk benchmark lost a block")
        finish(slot)


def _one_repeat(root: str, layout: KVLayout, total_bytes: int, region_bytes: int, io_threads: int,
                direct: bool, tier_first: bool) -> dict[str, float]:
    """GB/s of each measurement; the tier and the raw file take turns going first (the drive drifts)."""
    block_bytes = layout.block_bytes
    num_blocks = total_bytes // block_bytes
    moved = num_blocks * block_bytes
    raw_path = os.path.join(root, "raw.bin")
    sources = [torch.randint(0, 256, (block_bytes,), dtype=torch.uint8) for _ in range(_SOURCES)]
    keys = [i.to_bytes(16, "little") for i in range(num_blocks)]
    per_region = region_bytes // entry_bytes(block_bytes)
    # Sized to the run (no eviction), with regions of ``region_bytes`` as a tier of a real drive has them
    # (min_regions=1: a tier this small would otherwise be cut into smaller regions).
    config = DiskConfig(paths=(os.path.join(root, "tier"),), region_bytes=region_bytes,
                        capacity_bytes=(-(-num_blocks // per_region) + 1) * region_bytes, min_regions=1,
                        io_threads=io_threads, direct_io="auto" if direct else "off")
    # Twice as many reads in flight as the tier has I/O threads: a thread that finishes one finds the next
    # queued, so the drive sees ``io_threads`` at a time, as raw does (the store submits a whole prefix's
    # promotions at once). With only ``io_threads`` in flight, each completion's round trip through the
    # caller left a thread idle: 0.87x of raw at 256 KiB for the same pool reading raw blocks.
    slots = [aligned_tensor(block_bytes) for _ in range(_READS_IN_FLIGHT_PER_THREAD * io_threads)]
    for slot in slots:  # touched, as a store's prefaulted arena slots are: a first touch is not a read
        slot.fill_(0)
    caller = torch.empty(block_bytes, dtype=torch.uint8).numpy()
    seconds: dict[str, float] = {}
    with DiskTier(config, layout) as tier:

        def write() -> None:
            for i, key in enumerate(keys):
                tier.offer(key, sources[i % _SOURCES])
            tier.flush()

        def raw_write(*, tier_next: bool) -> None:
            # The baseline with the tier's threads runs next to the tier, in both orders (the drive drifts).
            runs = [("raw_write_1t", region_bytes, 1), ("raw_write", _RAW_WRITE_IO_BYTES, io_threads)]
            for name, io_bytes, threads in runs if tier_next else runs[::-1]:
                seconds[name] = _raw_io(raw_path, moved, io_bytes, threads, direct, write=True)

        def raw_read(*, tier_next: bool) -> None:
            runs = [("raw_read_1t", 1), ("raw_read", io_threads)]
            for name, threads in runs if tier_next else runs[::-1]:
                seconds[name] = _raw_io(raw_path, moved, block_bytes, threads, direct, write=False)

        def read() -> None:
            seconds["read"] = _timed(lambda: _read_all(tier, keys, slots, lambda slot: None))

        def tier_write() -> None:
            seconds["write"] = _timed(write)

        if tier_first:
            tier_write()
            raw_write(tier_next=False)
            read()
            raw_read(tier_next=False)
        else:
            raw_write(tier_next=True)
            tier_write()
            raw_read(tier_next=True)
            read()
        seconds["restore"] = _timed(lambda: _read_all(tier, keys, slots,
                                                      lambda slot: np.copyto(caller, slot.numpy())))
        per_call = _per_call_reads(tier, keys, raw_path, block_bytes, direct)
        if tier.stats().used_blocks != num_blocks:
            raise RuntimeError("the disk benchmark's tier did not keep every block")
    os.unlink(raw_path)
    shutil.rmtree(config.paths[0])
    return {**{name: gbps(moved, value) for name, value in seconds.items()}, **per_call}


def _per_call_reads(tier: DiskTier, keys: list[bytes], raw_path: str, block_bytes: int,
                    direct: bool) -> dict[str, float]:
    """Median ms of one-block reads, nothing else in flight: the tier's ``read_into`` and a raw ``preadv``."""
    dst = aligned_tensor(block_bytes)
    buffer = memoryview(aligned_buffer(block_bytes))
    step = max(1, len(keys) // _PER_CALL_READS)  # spread over the file: not the blocks just read
    tier_s: list[float] = []
    raw_s: list[float] = []
    fd = os.open(raw_path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        for i in range(0, len(keys), step)[:_PER_CALL_READS]:
            raw_s.append(_timed(functools.partial(os.preadv, fd, [buffer], i * block_bytes)))
            start = time.perf_counter()
            if not tier.read_into(keys[i], dst):
                raise RuntimeError("the disk benchmark lost a block")
            tier_s.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return {"per_call_read": statistics.median(tier_s), "per_call_raw_read": statistics.median(raw_s)}


def measure_prefix_lookup(path: str, repeats: int) -> dict[str, float]:
    """Median us of a 64-block prefix lookup (no prefetch) with the blocks in host RAM, then only on disk."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1024, dtype="uint8", block_tokens=4, kind="latent")
    root = tempfile.mkdtemp(prefix="kvtier-bench-lookup-", dir=path)
    # The host holds one prefix: a second one evicts the first, which write-through already put on disk.
    config = StoreConfig(host=HostConfig(capacity_bytes=_LOOKUP_BLOCKS * 4096),
                         disk=DiskConfig(paths=(root,), region_bytes=_MiB, capacity_bytes=4 * _MiB,
                                         write_mode="through", admission="admit_all"))
    try:
        with Store(layout, config) as store:
            hasher = store.hasher("bench-lookup")
            blocks = [torch.zeros(layout.block_numel, dtype=torch.uint8)] * _LOOKUP_BLOCKS
            keys, others = (hasher.keys([seed] * (_LOOKUP_BLOCKS * layout.block_tokens)) for seed in (1, 2))
            store.put(keys, blocks).wait()
            store.flush()
            calls = max(50, 20 * repeats)
            host_s = median_seconds(lambda: store.lookup(keys, prefetch=False), calls)
            store.put(others, blocks).wait()
            store.flush()
            found = store.lookup(keys, prefetch=False)
            if found.num_blocks != _LOOKUP_BLOCKS or set(found.tiers) != {"disk"}:
                raise RuntimeError(f"the lookup benchmark's prefix is not all on disk: {found.tiers}")
            disk_s = median_seconds(lambda: store.lookup(keys, prefetch=False), calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"lookup_prefix_blocks": _LOOKUP_BLOCKS, "lookup_host_us": round(host_s * 1e6, 1),
            "lookup_disk_us": round(disk_s * 1e6, 1), "lookup_disk_vs_host": round(disk_s / host_s, 3)}


def run_disk_bench(path: str, block_bytes: int, total_bytes: int, repeats: int, *, region_bytes: int = 64 * _MiB,
                   io_threads: int = 4) -> dict[str, object]:
    """Disk tier and raw figures for ``total_bytes`` of ``block_bytes`` blocks in a directory under ``path``."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=block_bytes, dtype="uint8", block_tokens=1,
                      kind="latent")
    total_bytes = max(total_bytes, block_bytes)
    region_bytes = max(region_bytes, entry_bytes(block_bytes))
    os.makedirs(path, exist_ok=True)
    root = tempfile.mkdtemp(prefix="kvtier-bench-disk-", dir=path)
    try:
        direct = supports_direct_io(root)
        runs = [_one_repeat(root, layout, total_bytes, region_bytes, io_threads, direct, tier_first=bool(i % 2))
                for i in range(repeats)]
        lookup = measure_prefix_lookup(root, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(name: str) -> float:
        return round(statistics.median(run[name] for run in runs), 3)

    def ratio(name: str, raw: str) -> float:
        return round(statistics.median(run[name] / run[raw] for run in runs), 3)

    return {
        "benchmark": "disk",
        "block_bytes": block_bytes,
        "total_bytes": total_bytes // block_bytes * block_bytes,
        "region_bytes": region_bytes,
        "io_threads": io_threads,
        "raw_write_io_bytes": _RAW_WRITE_IO_BYTES,
        "repeats": repeats,
        "direct_io": direct,
        "disk_write_gbps": median("write"),
        "disk_read_gbps": median("read"),
        "raw_write_gbps": median("raw_write"),
        "raw_read_gbps": median("raw_read"),
        "raw_write_1t_gbps": median("raw_write_1t"),
        "raw_read_1t_gbps": median("raw_read_1t"),
        "restore_gbps": median("restore"),
        # Medians of the per-repeat ratios: each pair ran back to back, so drive drift cancels out.
        "write_vs_raw": ratio("write", "raw_write"),
        "read_vs_raw": ratio("read", "raw_read"),
        "write_vs_raw_1t": ratio("write", "raw_write_1t"),
        "read_vs_raw_1t": ratio("read", "raw_read_1t"),
        "per_call_read_ms": round(1e3 * statistics.median(run["per_call_read"] for run in runs), 3),
        "per_call_raw_read_ms": round(1e3 * statistics.median(run["per_call_raw_read"] for run in runs), 3),
        "per_call_read_vs_raw": round(statistics.median(run["per_call_read"] / run["per_call_raw_read"]
                                                        for run in runs), 3),
        **lookup,
        "torch_threads": torch.get_num_threads(),
        "unix_time": int(time.time()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", default=None,
                        help="directory on the filesystem to measure (default: disk.paths[0], else the current "
                             "directory); a scratch directory is created and removed under it")
    parser.add_argument("--block-bytes", type=int, default=2 * _MiB,
                        help="block size (2 MiB: 16 tokens of Llama-3.1-8B in bf16)")
    parser.add_argument("--total-mib", type=int, default=768, help="MiB written and read per repeat")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    path = args.path or (config.disk.paths[0] if config.disk.paths else os.getcwd())
    result = run_disk_bench(path, args.block_bytes, args.total_mib * _MiB, args.repeats,
                            region_bytes=config.disk.region_bytes, io_threads=config.disk.io_threads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"disk tier, {result['block_bytes']} B blocks, direct_io={result['direct_io']}, raw with "
          f"{result['io_threads']} threads (1 thread): "
          f"write {result['disk_write_gbps']} GB/s (raw {result['raw_write_gbps']}, x{result['write_vs_raw']}; "
          f"{result['raw_write_1t_gbps']}, x{result['write_vs_raw_1t']}), "
          f"read {result['disk_read_gbps']} GB/s (raw {result['raw_read_gbps']}, x{result['read_vs_raw']}; "
          f"{result['raw_read_1t_gbps']}, x{result['read_vs_raw_1t']}), restore {result['restore_gbps']} GB/s")
    print(f"one block per call: read {result['per_call_read_ms']} ms (raw {result['per_call_raw_read_ms']} ms, "
          f"x{result['per_call_read_vs_raw']}); {result['lookup_prefix_blocks']}-block prefix lookup: "
          f"{result['lookup_disk_us']} us on disk, {result['lookup_host_us']} us in host "
          f"(x{result['lookup_disk_vs_host']})")
    return 0
