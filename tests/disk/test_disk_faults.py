"""Failures: corrupt, truncated or unreadable data is a miss and a counter; a failed write degrades the tier
until a probe finds writes working again."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, MemoryDevice
from kvtier.disk import tier as tier_module
from kvtier.errors import FlushTimeoutError

if TYPE_CHECKING:
    from conftest import DiskKit

Config = Callable[..., DiskConfig]
ENTRY = 20 * 1024  # a 16 KiB block plus its header page


def data_file(cfg: DiskConfig) -> Path:
    return Path(cfg.paths[0]) / "kvtier-data.bin"


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x40]))


@pytest.mark.parametrize("where", [20, 4096 + 5000, 4096 + 16383], ids=["header", "payload", "payload-end"])
def test_a_flipped_byte_in_the_file_is_a_counted_miss(disk_config: Config, kit: DiskKit, where: int) -> None:
    cfg = disk_config()
    with DiskTier(cfg, kit.layout) as tier:
        kit.fill(tier, range(12))
        tier.flush()
    flip_byte(data_file(cfg), 2 * ENTRY + where)  # region 0 is at the start of the file; block 2 is its third
    with DiskTier(cfg, kit.layout) as tier:
        assert kit.read(tier, 2) is None
        stats = tier.stats()
        assert (stats.checksum_failures, stats.misses, stats.hits) == (1, 1, 0)
        assert not tier.contains(kit.key(2))  # dropped, so the next lookup misses without I/O
        kit.assert_holds(tier, range(2))
        kit.assert_holds(tier, range(3, 12))


def test_a_truncated_data_file_is_a_miss_for_what_was_cut(disk_config: Config, kit: DiskKit) -> None:
    cfg = disk_config()
    with DiskTier(cfg, kit.layout) as tier:
        kit.fill(tier, range(36))
        tier.flush()
        os.truncate(data_file(cfg), kit.region + 5 * ENTRY + 4096)  # while open: reads past the end come back short
        kit.assert_holds(tier, range(17))
        assert kit.read(tier, 17) is None and kit.read(tier, 30) is None
        assert tier.stats().checksum_failures == 2
    os.truncate(data_file(cfg), kit.region)  # while closed: the reopen extends the file with zeros
    with DiskTier(cfg, kit.layout) as tier:
        kit.assert_holds(tier, range(12))
        assert kit.read(tier, 12) is None and tier.stats().checksum_failures == 1


def memory_devices() -> tuple[dict[str, MemoryDevice], Callable[[str, int, bool], MemoryDevice]]:
    """A device factory that keeps one ``MemoryDevice`` per path, so a reopen sees the same bytes."""
    devices: dict[str, MemoryDevice] = {}

    def factory(path: str, size: int, direct: bool) -> MemoryDevice:
        return devices.setdefault(path, MemoryDevice(size, direct))

    return devices, factory


def test_corruption_through_a_fake_device(disk_config: Config, kit: DiskKit) -> None:
    devices, factory = memory_devices()
    cfg = disk_config()
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(24))
        tier.flush()
        (device,) = devices.values()
        device.corrupt(ENTRY * 4 + 4096 + 7)  # block 4's payload
        device.corrupt(kit.region + ENTRY * 1 + 20)  # block 13's header
        assert kit.read(tier, 4) is None and kit.read(tier, 13) is None
        kit.assert_holds(tier, range(4))
        device.read_errno = errno.EIO
        assert kit.read(tier, 5) is None
        stats = tier.stats()
        assert (stats.checksum_failures, stats.io_errors, stats.admitting) == (2, 1, True)
        device.read_errno = None
        kit.assert_holds(tier, range(5, 6))  # an I/O error does not drop the block


@pytest.mark.parametrize(("error", "fault", "counter"), [(errno.ENOSPC, "full", "disk_full_errors"),
                                                         (errno.EIO, "io_error", "io_errors")], ids=["ENOSPC", "EIO"])
def test_a_failed_write_degrades_the_tier_which_admits_again_once_writes_work(
        disk_config: Config, kit: DiskKit, error: int, fault: str, counter: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tier_module, "_FIRST_RETRY_S", 0.3)
    devices, factory = memory_devices()
    cfg = disk_config()
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(12))
        tier.flush()
        (device,) = devices.values()
        device.write_errno = error
        with caplog.at_level(logging.WARNING, logger="kvtier.disk.tier"):
            kit.fill(tier, range(12, 24))
            tier.flush()  # the second region's write fails
            assert not tier.offer(kit.key(99), kit.payload(99))
            stats = tier.stats()
            assert (stats.admitting, stats.fault, getattr(stats, counter), stats.used_blocks) == (False, fault, 1, 12)
            assert stats.degraded_rejected == 1 and stats.io_errors + stats.disk_full_errors == 1
            kit.assert_holds(tier, range(12))
            assert kit.read(tier, 12) is None
            time.sleep(0.35)  # past the pause: the next offer is a probe, and it fails too
            kit.fill(tier, range(30, 42))
            tier.flush()
            assert not tier.offer(kit.key(98), kit.payload(98))  # the pause doubled
            assert getattr(tier.stats(), counter) == 2
            device.write_errno = None
            time.sleep(0.65)
            kit.fill(tier, range(42, 54))  # the probe that works ends the fault
            tier.flush()
            stats = tier.stats()
            assert (stats.admitting, stats.fault, stats.used_blocks) == (True, "", 24)
            kit.assert_holds(tier, range(12))
            kit.assert_holds(tier, range(42, 54))
        messages = [r.message for r in caplog.records]
        assert len([m for m in messages if "are still served" in m]) == 1  # once per change of state
        assert ("is full" in messages[0] and "disk.capacity_bytes" in messages[0]) == (fault == "full")
        assert len([m for m in messages if "admitting blocks" in m]) == 1
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        assert tier.stats().admitting
        kit.assert_holds(tier, range(12))
        kit.assert_holds(tier, range(42, 54))
        assert not tier.contains(kit.key(12)) and not tier.contains(kit.key(30))


class GatedDevice(MemoryDevice):
    """Writes wait until ``gate`` is set: a drive that has fallen behind."""

    def __init__(self, size: int, direct_io: bool = True) -> None:
        super().__init__(size, direct_io)
        self.gate = threading.Event()

    def _pwritev(self, offset: int, buffer: memoryview) -> int:
        self.gate.wait(30)
        return super()._pwritev(offset, buffer)


def test_offer_without_wait_refuses_while_the_drive_is_behind(kit: DiskKit, disk_config: Config) -> None:
    devices: list[GatedDevice] = []

    def factory(path: str, size: int, direct: bool) -> GatedDevice:
        devices.append(GatedDevice(size, direct))
        return devices[-1]

    with DiskTier(disk_config(writeback_buffer_bytes=3 * kit.region), kit.layout, device_factory=factory) as tier:
        admitted = [tier.offer(kit.key(i), kit.payload(i), wait=False) for i in range(4 * kit.per_region)]
        # Three region buffers fill (two wait on the drive, one open), then offers are refused, not blocked.
        assert admitted.count(True) == 3 * kit.per_region and not any(admitted[3 * kit.per_region :])
        assert tier.stats().busy_rejected == kit.per_region
        devices[0].gate.set()
        tier.flush()
        kit.assert_holds(tier, range(3 * kit.per_region))
        assert tier.offer(kit.key(999), kit.payload(999), wait=False)


def test_a_flush_past_its_deadline_raises_while_the_drive_is_behind(kit: DiskKit, disk_config: Config) -> None:
    devices: list[GatedDevice] = []

    def factory(path: str, size: int, direct: bool) -> GatedDevice:
        devices.append(GatedDevice(size, direct))
        return devices[-1]

    with DiskTier(disk_config(), kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(kit.per_region + 2))
        started = time.monotonic()
        with pytest.raises(FlushTimeoutError):
            tier.flush(time.monotonic() + 0.2)
        assert time.monotonic() - started < 5
        devices[0].gate.set()
        tier.flush(time.monotonic() + 30)
        kit.assert_holds(tier, range(kit.per_region + 2))


def test_close_returns_by_its_deadline_while_the_drive_is_stuck(kit: DiskKit, disk_config: Config,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    devices: list[GatedDevice] = []

    def factory(path: str, size: int, direct: bool) -> GatedDevice:
        devices.append(GatedDevice(size, direct))
        return devices[-1]

    tier = DiskTier(disk_config(), kit.layout, device_factory=factory)
    kit.fill(tier, range(kit.per_region + 2))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kvtier.disk.tier"):
        tier.close(timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert any("did not finish" in record.message for record in caplog.records)
    tier.close()  # idempotent
    devices[0].gate.set()  # the drive comes back: the threads it held finish


def test_an_index_damaged_while_running_refuses_until_a_restart_which_rebuilds_it(
        disk_config: Config, kit: DiskKit, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tier_module, "_FIRST_RETRY_S", 0.2)
    cfg = disk_config(reinsert_hits=0)
    with DiskTier(cfg, kit.layout) as tier, caplog.at_level(logging.ERROR, logger="kvtier.disk.tier"):
        kit.fill(tier, range(24))
        tier.flush()
        index = Path(cfg.paths[0]) / "kvtier-index" / "data.mdb"
        with index.open("r+b") as file:  # every page but the two meta pages zeroed: LMDB finds no valid tree
            for page in range(2, index.stat().st_size // 4096):
                file.seek(page * 4096)
                file.write(bytes(4096))
        kit.fill(tier, range(24, 36))
        tier.flush()
        stats = tier.stats()
        assert (stats.fault, stats.admitting, stats.used_blocks) == ("damaged", False, 24)
        kit.assert_holds(tier, range(24))  # the table is in memory: what is stored is still served
        time.sleep(0.25)
        assert not tier.offer(kit.key(99), kit.payload(99))  # permanent: no probe
        (message,) = [r.message for r in caplog.records if "damaged" in r.message]
        assert "restart" in message
    with DiskTier(cfg, kit.layout) as tier:  # the restart finds the index corrupt and rebuilds it
        assert tier.stats().admitting
        kit.assert_holds(tier, range(24))
        kit.fill(tier, range(100, 112))
