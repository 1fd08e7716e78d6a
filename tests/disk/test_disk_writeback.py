"""The write-back buffer: a burst of demotions far faster than the drive is written, not dropped, up to the
buffer's size; what does not fit is refused at once (never waited for) and counted as ``busy_rejected``, as
is a demotion whose room would evict a region a read in flight still reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, MemoryDevice, aligned_tensor

if TYPE_CHECKING:
    from conftest import DiskKit

Config = Callable[..., DiskConfig]


class ThrottledDevice(MemoryDevice):
    """A memory device that writes at ``bytes_per_s``: a drive far slower than the memory a burst comes from."""

    def __init__(self, size: int, direct_io: bool = True, bytes_per_s: float = 1 << 20) -> None:
        super().__init__(size, direct_io)
        self.bytes_per_s = bytes_per_s

    def _pwritev(self, offset: int, buffer: memoryview) -> int:
        time.sleep(len(buffer) / self.bytes_per_s)
        return super()._pwritev(offset, buffer)


def burst(tier: DiskTier, kit: DiskKit, count: int) -> list[bool]:
    payloads = [kit.payload(i) for i in range(count)]  # made first: the burst itself runs at memory speed
    return [tier.offer(kit.key(i), payload, wait=False) for i, payload in enumerate(payloads)]


def test_a_burst_of_four_buffers_keeps_every_block_that_fits_the_buffer(disk_config: Config, kit: DiskKit) -> None:
    buffer_regions = 4
    buffer_blocks = buffer_regions * kit.per_region
    cfg = disk_config(capacity_bytes=32 * kit.region, writeback_buffer_bytes=buffer_regions * kit.region)

    def factory(path: str, size: int, direct: bool) -> ThrottledDevice:
        return ThrottledDevice(size, direct, bytes_per_s=1 << 20)  # a 240 KiB region takes ~0.23 s

    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        started = time.monotonic()
        admitted = burst(tier, kit, 4 * buffer_blocks)
        burst_s = time.monotonic() - started
        # Every block up to the buffer's size is taken, in order, whatever the drive did meanwhile.
        assert all(admitted[:buffer_blocks])
        taken = admitted.count(True)
        assert tier.stats().busy_rejected == len(admitted) - taken
        if burst_s < 0.2:  # the drive cannot have written a region yet: the rest was refused, not waited for
            assert taken == buffer_blocks and not any(admitted[buffer_blocks:])
        tier.flush()
        kit.assert_holds(tier, range(buffer_blocks))
        for i in range(buffer_blocks, len(admitted)):
            assert tier.contains(kit.key(i)) == admitted[i]
        assert tier.stats().bytes_written == taken * (kit.block + 4096)


def test_the_buffer_is_at_least_three_regions_and_the_drive_limits_it(disk_config: Config, kit: DiskKit) -> None:
    assert disk_config(writeback_buffer_bytes=1).writeback_regions == 3
    assert disk_config(writeback_buffer_bytes=7 * kit.region + 1).writeback_regions == 7
    # A buffer bigger than the disk holds at most the disk's regions in flight, and still never blocks.
    cfg = disk_config(writeback_buffer_bytes=64 * kit.region)

    def factory(path: str, size: int, direct: bool) -> ThrottledDevice:
        return ThrottledDevice(size, direct, bytes_per_s=4 << 20)

    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        admitted = burst(tier, kit, 8 * kit.per_region)
        assert all(admitted[: 4 * kit.per_region])
        assert tier.stats().busy_rejected == admitted.count(False)
        tier.flush()
        assert tier.stats().used_blocks <= tier.capacity_blocks


class GatedReadDevice(MemoryDevice):
    """A memory device whose reads wait for ``gate`` once ``armed``: a drive slow to answer (a bad sector)."""

    armed = threading.Event()
    entered = threading.Event()
    gate = threading.Event()

    def _preadv(self, offset: int, buffers: list[memoryview]) -> int:
        if self.armed.is_set():
            self.entered.set()
            self.gate.wait(30)
        return super()._preadv(offset, buffers)


def test_a_demotion_whose_room_evicts_a_region_being_read_is_refused_not_waited_for(
        disk_config: Config, kit: DiskKit) -> None:
    """``offer(wait=False)`` runs under the store's lock: waiting for a read in flight of the region its room
    evicts would stall every store call for as long as the drive takes to answer that read."""
    def factory(path: str, size: int, direct: bool) -> GatedReadDevice:
        return GatedReadDevice(size, direct)

    with DiskTier(disk_config(reinsert_hits=0), kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(4 * kit.per_region))  # every region sealed: the next one evicts block 0's
        tier.flush()
        GatedReadDevice.armed.set()
        try:
            reader = tier.submit_read(kit.key(0), aligned_tensor(kit.block))
            assert GatedReadDevice.entered.wait(5)
            refused: list[bool] = []
            demoting = threading.Thread(target=lambda: refused.append(not tier.offer(kit.key(999), kit.payload(999),
                                                                                     wait=False)), daemon=True)
            demoting.start()
            demoting.join(5)
            assert not demoting.is_alive(), "offer(wait=False) waited for a read in flight"
            assert refused == [True] and tier.stats().busy_rejected == 1
        finally:
            GatedReadDevice.gate.set()
        assert reader.result(30)
        assert tier.offer(kit.key(999), kit.payload(999), wait=False)  # the read done, the region can go
        kit.assert_holds(tier, range(999, 1000))
