"""An open region is written behind its appends (``_STREAM_BYTES`` at a time), and that changes nothing a
reader or a restart sees: entries are committed only once the whole region is written and synced."""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, MemoryDevice
from kvtier.disk import tier as tier_module

if TYPE_CHECKING:
    from conftest import DiskKit

Config = Callable[..., DiskConfig]
ENTRY = 20 * 1024  # a 16 KiB block plus its header page


class RecordingDevice(MemoryDevice):
    """Records every write in ``recorded`` as ``(offset, nbytes)``; fails writes from the ``fail_from``-th on;
    holds every sync until ``syncs_allowed`` is set."""

    def __init__(self, size: int, direct_io: bool = True) -> None:
        super().__init__(size, direct_io)
        self.recorded: list[tuple[int, int]] = []
        self.syncs = 0
        self.fail_from: int | None = None
        self.syncs_allowed = threading.Event()
        self.syncs_allowed.set()

    def _pwritev(self, offset: int, buffer: memoryview) -> int:
        self.recorded.append((offset, len(buffer)))
        if self.fail_from is not None and len(self.recorded) > self.fail_from:
            raise OSError(errno.EIO, "injected")
        return super()._pwritev(offset, buffer)

    def sync(self) -> None:
        assert self.syncs_allowed.wait(30)
        self.syncs += 1
        super().sync()


@pytest.fixture
def devices(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, RecordingDevice],
                                                       Callable[[str, int, bool], RecordingDevice]]:
    monkeypatch.setattr(tier_module, "_STREAM_BYTES", 2 * ENTRY)
    found: dict[str, RecordingDevice] = {}

    def factory(path: str, size: int, direct: bool) -> RecordingDevice:
        return found.setdefault(path, RecordingDevice(size, direct))

    return found, factory


def test_a_filling_region_is_written_behind_its_appends_and_survives_a_restart(
        disk_config: Config, kit: DiskKit, devices: tuple[dict[str, RecordingDevice], Callable[..., RecordingDevice]]
) -> None:
    found, factory = devices
    cfg = disk_config()
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(5))  # 5 entries: two parts of two entries go to the drive while the region is open
        (device,) = found.values()
        region = tier._open
        assert region is not None
        for write in region.writes:
            write.result(30)
        assert sorted(device.recorded) == [(0, 2 * ENTRY), (2 * ENTRY, 2 * ENTRY)] and device.syncs == 0
        index = tier._index
        assert index is not None and not index.load()[1]  # no entry committed before the region's sync
        kit.assert_holds(tier, range(5))  # served from the buffer meanwhile
        kit.fill(tier, range(5, 30))  # two regions full (12 entries each), a third open
        tier.flush()
        kit.assert_holds(tier, range(30))
        written = sorted(device.recorded)
        for (offset, nbytes), (following, _) in itertools.pairwise(written):
            assert offset + nbytes <= following  # no byte written twice
        region_bytes = [sum(n for o, n in written if r * kit.region <= o < (r + 1) * kit.region) for r in range(3)]
        assert region_bytes == [12 * ENTRY, 12 * ENTRY, 6 * ENTRY]
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        kit.assert_holds(tier, range(30))
        assert tier.stats().torn_regions_discarded == 0


def test_a_failed_part_write_drops_the_region_and_nothing_of_it_comes_back(
        disk_config: Config, kit: DiskKit, devices: tuple[dict[str, RecordingDevice], Callable[..., RecordingDevice]]
) -> None:
    found, factory = devices
    cfg = disk_config()
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        kit.fill(tier, range(12))
        tier.flush()
        (device,) = found.values()
        device.fail_from = len(device.recorded) + 1  # the second part of the next region fails
        kit.fill(tier, range(12, 24))
        tier.flush()
        stats = tier.stats()
        assert (stats.admitting, stats.fault, stats.io_errors, stats.used_blocks) == (False, "io_error", 1, 12)
        kit.assert_holds(tier, range(12))
        assert all(kit.read(tier, i) is None for i in range(12, 24))
    device.fail_from = None
    with DiskTier(cfg, kit.layout, device_factory=factory) as tier:
        assert tier.stats().admitting and tier.stats().torn_regions_discarded == 1
        kit.assert_holds(tier, range(12))
        assert not any(tier.contains(kit.key(i)) for i in range(12, 24))


def test_the_next_regions_parts_are_written_while_sealed_regions_wait_for_their_sync(
        disk_config: Config, kit: DiskKit, devices: tuple[dict[str, RecordingDevice], Callable[..., RecordingDevice]]
) -> None:
    found, factory = devices
    with DiskTier(disk_config(), kit.layout, device_factory=factory) as tier:
        (device,) = found.values()
        device.syncs_allowed.clear()  # the drive is slow to sync: two sealed regions wait for theirs
        kit.fill(tier, range(2 * kit.per_region + 5))  # a third region open, two parts of it due
        deadline = time.monotonic() + 30
        while sum(offset >= 2 * kit.region for offset, _ in device.recorded) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = sorted((offset, nbytes) for offset, nbytes in device.recorded if offset >= 2 * kit.region)
        assert third == [(2 * kit.region, 2 * ENTRY), (2 * kit.region + 2 * ENTRY, 2 * ENTRY)]
        assert device.syncs == 0
        index = tier._index
        assert index is not None and not index.load()[1]  # nothing committed before its region's sync
        device.syncs_allowed.set()
        tier.flush()
        kit.assert_holds(tier, range(2 * kit.per_region + 5))
    with DiskTier(disk_config(), kit.layout, device_factory=factory) as tier:
        kit.assert_holds(tier, range(2 * kit.per_region + 5))
