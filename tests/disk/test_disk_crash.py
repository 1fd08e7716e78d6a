"""Crash safety with real processes: a writer SIGKILLed mid-write loses nothing committed and serves no
wrong bytes after a reopen; a region left open by a crash is discarded and counted."""

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
