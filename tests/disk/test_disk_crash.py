"""Crash safety with real processes: a writer SIGKILLed mid-write loses nothing committed and serves no
wrong bytes after a reopen; a region left open by a crash is discarded and counted; a flush or close while
a region is being opened writes that region (its reinserted blocks) before it returns."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, aligned_tensor

if TYPE_CHECKING:
    from conftest import DiskKit

Config = Callable[..., DiskConfig]
REPO = Path(__file__).resolve().parents[2]

# The writer offers the blocks of DiskKit.payload. With `every` > 0 it flushes every `every` blocks and prints
# how many blocks are committed after each flush, forever. With `every` = 0 it writes and flushes one region
# (printing 12), then tears the next region's write: half of it reaches the file, then the process kills
# itself. A third argument sets the bytes of an open region written behind its appends (parts torn too).
WRITER = """
import os, signal, sys, torch
import kvtier.disk.tier as tier_module
from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, FileDevice
from kvtier.layout import KVLayout

class Tearing(FileDevice):
    armed = False
    def _pwritev(self, offset, buffer):
        if Tearing.armed:
            os.pwritev(self._fd, [buffer[: len(buffer) // 2]], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        return super()._pwritev(offset, buffer)

path, every = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    tier_module._STREAM_BYTES = int(sys.argv[3])
layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=16)
config = DiskConfig(paths=(path,), capacity_bytes=64 << 20, region_bytes=256 << 10, io_threads=2)
tier = DiskTier(config, layout, device_factory=Tearing)
i = 0
while True:
    block = torch.randint(0, 256, (layout.block_bytes,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(i))
    tier.offer(i.to_bytes(16, "little"), block)
    i += 1
    if (every and i % every == 0) or i in (12, 24):
        tier.flush()
        print(i, flush=True)
        Tearing.armed = not every
"""


STREAM = [None, 2 * 20 * 1024]  # the default (never within a 256 KiB region), and every two entries


def writer(path: str, every: int, stream: int | None = None) -> subprocess.Popen[str]:
    extra = [] if stream is None else [str(stream)]
    return subprocess.Popen([sys.executable, "-c", WRITER, path, str(every), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def check_everything_readable(tier: DiskTier, kit: DiskKit, committed: int, tried: int) -> int:
    """Every committed block reads back identical; any other block present is identical too."""
    dst = aligned_tensor(kit.block)
    present = 0
    for i in range(tried):
        if tier.read_into(kit.key(i), dst):
            assert torch.equal(dst, kit.payload(i)), f"block {i} came back with other bytes"
            present += 1
        else:
            assert i >= committed, f"committed block {i} was lost"
    assert tier.stats().checksum_failures == 0
    return present


@pytest.mark.parametrize("stream", STREAM)
def test_sigkill_mid_write_loses_nothing_committed(disk_config: Config, kit: DiskKit, stream: int | None) -> None:
    kill_after = 100
    cfg = disk_config(capacity_bytes=64 << 20)
    child = writer(cfg.paths[0], every=7, stream=stream)
    assert child.stdout is not None
    committed = 0
    for line in child.stdout:
        committed = int(line)
        if committed >= kill_after:
            break
    child.send_signal(signal.SIGKILL)  # the child keeps offering and writing regions until it dies
    child.wait(timeout=30)
    assert committed >= kill_after
    with DiskTier(cfg, kit.layout) as tier:
        present = check_everything_readable(tier, kit, committed, committed + 2000)
        assert present >= committed


@pytest.mark.parametrize("stream", STREAM)
def test_a_region_torn_by_a_crash_is_discarded(disk_config: Config, kit: DiskKit, stream: int | None) -> None:
    cfg = disk_config(capacity_bytes=64 << 20)
    child = writer(cfg.paths[0], every=0, stream=stream)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and out.split() == ["12"]
    with DiskTier(cfg, kit.layout) as tier:
        assert check_everything_readable(tier, kit, 12, 24) == 12
        assert tier.stats().torn_regions_discarded == 1


# Fills a tier of 4 regions, reads half of region 0's blocks once (hot: reinserted when region 0 is evicted),
# makes the reinsertion's reads slow, then offers one more block (argv[2] "wait": the offer opens the next
# region itself; "nowait": as the store demotes, it is refused and the region opens on the I/O pool) and calls
# argv[3] ("flush" or "close") while the region is being opened. Prints what the offer returned and DONE,
# then dies at once.
OPENING = """
import os, sys, threading, time, torch
from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, aligned_tensor
from kvtier.layout import KVLayout

layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=16)
def key(i): return i.to_bytes(16, "little")
def payload(i):
    return torch.randint(0, 256, (layout.block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
config = DiskConfig(paths=(sys.argv[1],), capacity_bytes=4 * 256 * 1024, region_bytes=256 * 1024, min_regions=1,
                    io_threads=2, reinsert_hits=1)
tier = DiskTier(config, layout)
for i in range(48):
    assert tier.offer(key(i), payload(i))
tier.flush()
for i in range(6):
    assert tier.read_into(key(i), aligned_tensor(layout.block_bytes))
entered, gate, real = threading.Event(), threading.Event(), tier._read_entry
def slow_read(*args):
    entered.set()
    gate.wait(10)
    return real(*args)
tier._read_entry = slow_read
offer = threading.Thread(target=lambda: print(tier.offer(key(1000), payload(1000), wait=sys.argv[2] == "wait"),
                                              flush=True))
offer.start()
assert entered.wait(5)
ending = threading.Thread(target=getattr(tier, sys.argv[3]))
ending.start()
time.sleep(0.3)
gate.set()
offer.join()
ending.join()
print("DONE", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize(("mode", "offered", "ending"), [("wait", "True", "flush"), ("nowait", "False", "flush"),
                                                       ("wait", "True", "close")])
def test_a_flush_or_close_while_a_region_opens_writes_it_before_returning(disk_config: Config, kit: DiskKit, mode: str,
                                                                          offered: str, ending: str) -> None:
    """A region opened by eviction holds the hot blocks it reinserted, whose older copies its OPEN mark forgets;
    a flush or close that returned before writing it lost them (and the block offered into it) to the crash
    after."""
    cfg = disk_config(reinsert_hits=1)
    child = subprocess.run([sys.executable, "-c", OPENING, cfg.paths[0], mode, ending], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.stdout.split() == [offered, "DONE"], child.stdout + child.stderr
    with DiskTier(cfg, kit.layout) as tier:
        kit.assert_holds(tier, range(6))
        if mode == "wait":
            kit.assert_holds(tier, range(1000, 1001))
