"""Programs the full-filesystem tests run inside a mount namespace where ``MOUNT`` is a small tmpfs.

- ``tier MOUNT``: a disk tier on it stores blocks, then a filler file takes every free byte and the tier goes
  on being offered blocks until its index cannot grow: it prints the stats and log lines then, checks that
  the blocks stored before read back byte-identical, deletes the filler and checks that the tier admits
  (and records, across a reopen) new blocks without a restart. Prints ``OK`` at the end.
- ``daemon MOUNT``: ``kvtier serve`` with its disk tier on it and ``write_mode=through``; the filler takes
  the free space and a client keeps putting: the daemon keeps answering, and ``kvtier stats --json``'s disk
  detail shows the condition. Prints ``STATS <json>`` and ``OK``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import lmdb
import torch

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, aligned_tensor
from kvtier.disk import tier as tier_module
from kvtier.layout import KVLayout

# 4 KiB blocks: 32 entries to a 256 KiB region, so the index grows by pages while the data file (preallocated)
# does not grow at all.
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, dtype="bfloat16", block_tokens=16)
PER_REGION = 32


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def payload(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (LAYOUT.block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def holds(tier: DiskTier, ids: range) -> bool:
    dst = aligned_tensor(LAYOUT.block_bytes)
    return all(tier.read_into(key(i), dst) and torch.equal(dst, payload(i)) for i in ids)


def fill_up(path: Path) -> None:
    """Take every free byte of ``path``'s filesystem with a file."""
    with path.open("wb", buffering=0) as filler:
        for chunk in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\1" * chunk)


def tier(mount: str) -> None:
    # Short pauses keep the test short; the doubling and the cap are the tier's own.
    tier_module._FIRST_RETRY_S = 0.2
    tier_module._MAX_RETRY_S = 0.8
    log = StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("kvtier.disk.tier").addHandler(handler)
    # 16 regions of 32 blocks, as the test counts them (not the smaller regions min_regions would give).
    config = DiskConfig(paths=(f"{mount}/disk",), capacity_bytes="4MiB", region_bytes="256KiB", io_threads=2,
                        min_regions=1)
    stored = range(2 * PER_REGION)
    with DiskTier(config, LAYOUT) as disk:
        for i in stored:
            assert disk.offer(key(i), payload(i))
        disk.flush()
        fill_up(Path(mount) / "filler")
        assert disk._index is not None  # LMDB 0.9 reports a write the full filesystem cut short as EIO
        short_write = disk._index._error(lmdb.Error("mdb_txn_commit", errno.EIO), "cannot be written")
        print("SHORT_WRITE", type(short_write).__name__, flush=True)
        offered = 1000
        while disk.stats().fault == "" and offered < 1000 + 14 * PER_REGION:  # the index grows into the full fs
            disk.offer(key(offered), payload(offered))
            offered += 1
            if offered % PER_REGION == 0:
                disk.flush()
        stats = disk.stats()
        print("FULL", json.dumps({"fault": stats.fault, "disk_full_errors": stats.disk_full_errors,
                                  "io_errors": stats.io_errors, "admitting": stats.admitting}), flush=True)
        print("LOG", log.getvalue().replace("\n", " | "), flush=True)
        assert holds(disk, stored), "a block stored before the filesystem filled up did not read back"
        refused = sum(not disk.offer(key(i), payload(i)) for i in range(5000, 5000 + PER_REGION))
        print("REFUSED", refused, disk.stats().degraded_rejected, flush=True)
        (Path(mount) / "filler").unlink()
        after = range(9000, 9000 + 2 * PER_REGION)
        deadline = time.monotonic() + 30
        while disk.stats().fault and time.monotonic() < deadline:  # the next probe finds room
            time.sleep(0.1)
            for i in after:
                disk.offer(key(i), payload(i))
            disk.flush()
        for i in after:
            disk.offer(key(i), payload(i))
        disk.flush()
        stats = disk.stats()
        print("RECOVERED", json.dumps({"fault": stats.fault, "admitting": stats.admitting}), flush=True)
        assert holds(disk, stored) and holds(disk, after)
    with DiskTier(config, LAYOUT) as disk:  # recorded in the index: they survive a reopen
        assert holds(disk, stored) and holds(disk, after)
    print("LOG2", log.getvalue().replace("\n", " | "), flush=True)
    print("OK", flush=True)


def daemon(mount: str) -> None:
    from daemon_workers import LAYOUT as DAEMON_LAYOUT  # 1 KiB blocks: also 32 entries to a region
    from daemon_workers import block_for, key_of

    from kvtier import StoreConfig
    from kvtier.daemon import Client
    from kvtier.errors import KvtierError

    socket_path = f"{mount}/d.sock"
    # A host pool of 64 blocks: most blocks are read back from the disk tier.
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "--set", "host.prefault=false",
                             "--set", "disk.write_mode=through", "--set", "disk.capacity_bytes=4MiB",
                             "--set", "disk.region_bytes=256KiB", "--set", "disk.min_regions=1",
                             "--set", "disk.admission=admit_all",
                             "--set", "disk.writeback_buffer_bytes=768KiB", "serve", "--socket", socket_path,
                             "--pool", "256KiB", "--disk", f"{mount}/disk", "--metrics-port", "0", "--layout",
                             "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = Client(DAEMON_LAYOUT, StoreConfig(), address=f"unix:{socket_path}")
                break
            except KvtierError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        with client:
            stored = [key_of(i, "full") for i in range(64)]  # two regions
            for start in range(0, 80, 16):  # the 65th block seals the second region: it is written
                keys = [key_of(i, "full") for i in range(start, start + 16)]
                assert client.put(keys, [block_for(k) for k in keys]).wait(60).ok
            time.sleep(1)  # the through-writes reach the drive and the index
            fill_up(Path(mount) / "filler")
            detail: dict[str, object] = {}
            for batch in range(80):
                more = [key_of(i, "full") for i in range(1000 + 16 * batch, 1016 + 16 * batch)]
                client.put(more, [block_for(k) for k in more]).wait(60)
                done = subprocess.run([sys.executable, "-m", "kvtier.daemon", "stats", "--json", "--socket",
                                       socket_path], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                detail = json.loads(done.stdout)["stats"]["tiers"]["disk"]["detail"]
                if detail["fault"]:
                    break
            print("STATS", json.dumps(detail), flush=True)
            same = True
            for start in range(0, 64, 16):  # the host pool holds none of them now: they come from the disk
                keys = stored[start : start + 16]
                out = [torch.empty_like(block_for(k)) for k in keys]
                same &= client.get(keys, out).wait(60).ok and all(
                    torch.equal(o, block_for(k)) for o, k in zip(out, keys, strict=True))
            print("GET", same, flush=True)
            table = subprocess.run([sys.executable, "-m", "kvtier.daemon", "stats", "--socket", socket_path],
                                   capture_output=True, text=True, timeout=60)
            print("TABLE", table.stdout.replace("\n", " | "), flush=True)
        print("OK", flush=True)
    finally:
        proc.terminate()
        print("EXIT", proc.wait(30), flush=True)


if __name__ == "__main__":
    {"tier": tier, "daemon": daemon}[sys.argv[1]](sys.argv[2])
