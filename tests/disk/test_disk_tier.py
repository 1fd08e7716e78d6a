"""DiskTier: the region log, persistence, eviction with reinsertion, admission, budget, locking, formats."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, aligned_tensor, make_admission, supports_direct_io
from kvtier.disk import tier as tier_module
from kvtier.disk.tier import _TokenBucket
from kvtier.errors import (
    ClosedError,
    DirectoryLockedError,
    DiskError,
    FormatVersionError,
    InvalidInputError,
    LayoutMismatchError,
)
from kvtier.layout import KVLayout

if TYPE_CHECKING:
    from conftest import DiskKit

Config = Callable[..., DiskConfig]


@pytest.mark.parametrize("direct_io", ["auto", "off"])
def test_blocks_read_back_from_memory_then_disk_then_after_restart(disk_config: Config, kit: DiskKit,
                                                                   direct_io: str) -> None:
    cfg = disk_config(direct_io=direct_io)
    with DiskTier(cfg, kit.layout) as tier:
        assert tier.direct_io == (direct_io == "auto" and supports_direct_io(cfg.paths[0]))
        kit.fill(tier, range(30))
        kit.assert_holds(tier, range(30))  # 2 regions written, the third still open in memory
        tier.flush()
        kit.assert_holds(tier, range(30))
        stats = tier.stats()
        assert (stats.used_blocks, stats.hits, stats.misses, stats.direct_io) == (30, 60, 0, tier.direct_io)
        assert stats.bytes_written == 30 * (kit.block + 4096)
    with DiskTier(cfg, kit.layout) as tier:
        assert tier.contains(kit.key(29)) and not tier.contains(kit.key(30))
        kit.assert_holds(tier, range(30))
        assert tier.stats().torn_regions_discarded == 0


def test_direct_io_on_is_exercised_here_or_refused_clearly(disk_config: Config, kit: DiskKit,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = disk_config(direct_io="on")
    if supports_direct_io(str(Path(cfg.paths[0]).parent)):
        with DiskTier(cfg, kit.layout) as tier:
            kit.fill(tier, range(13))
            tier.flush()
            assert tier.direct_io and tier.stats().direct_io
            kit.assert_holds(tier, range(13))
    monkeypatch.setattr(tier_module, "supports_direct_io", lambda path: False)
    with pytest.raises(DiskError, match="O_DIRECT"):
        DiskTier(cfg, kit.layout)
    with DiskTier(disk_config(direct_io="auto"), kit.layout) as tier:
        assert not tier.direct_io  # auto falls back to buffered I/O


def test_fifo_eviction_reinserts_blocks_read_often_enough(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(reinsert_hits=2), kit.layout) as tier:
        assert tier.capacity_blocks == 4 * kit.per_region
        kit.fill(tier, range(4 * kit.per_region))
        for _ in range(2):
            assert kit.read(tier, 3) is not None  # block 3 of the oldest region becomes hot
        assert kit.read(tier, 5) is not None  # one read: below the threshold
        kit.fill(tier, range(100, 101))  # needs a fifth region: the oldest is evicted
        stats = tier.stats()
        assert (stats.regions_evicted, stats.blocks_reinserted) == (1, 1)
        assert tier.contains(kit.key(3)) and not tier.contains(kit.key(5)) and not tier.contains(kit.key(0))
        kit.assert_holds(tier, range(3, 4))
        tier.flush()
    with DiskTier(disk_config(reinsert_hits=2), kit.layout) as tier:
        kit.assert_holds(tier, range(3, 4))  # the reinserted copy was committed with its new region
        kit.assert_holds(tier, range(kit.per_region, 4 * kit.per_region))
        assert not tier.contains(kit.key(0))


def test_fifo_eviction_leaves_blocks_held_above_to_the_tier_above(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(reinsert_hits=1), kit.layout) as tier:
        tier.held_above = lambda key: key == kit.key(3)  # host RAM holds block 3 (promoted on its read)
        kit.fill(tier, range(4 * kit.per_region))
        assert kit.read(tier, 3) is not None and kit.read(tier, 5) is not None
        kit.fill(tier, range(100, 101))  # the oldest region is evicted
        assert tier.stats().blocks_reinserted == 1
        assert tier.contains(kit.key(5)) and not tier.contains(kit.key(3))


def test_a_small_tier_gets_min_regions_smaller_regions_and_evicts_fewer_blocks_at_once(
        disk_config: Config, kit: DiskKit) -> None:
    # 1 MiB in 16 regions of 64 KiB (3 entries of 20 KiB each) instead of 4 of 256 KiB (12 each).
    cfg = disk_config(min_regions=16)
    with DiskTier(cfg, kit.layout) as tier:
        assert tier.config.region_bytes == 64 * 1024 and tier.capacity_blocks == 16 * 3
        kit.fill(tier, range(49))  # the 49th block evicts the oldest region: blocks 0-2 only
        assert not any(tier.contains(kit.key(i)) for i in range(3))
        kit.assert_holds(tier, range(3, 49))
        tier.flush()
    with DiskTier(cfg, kit.layout) as tier:  # a reopen serves what was sealed
        kit.assert_holds(tier, range(3, 48))


@pytest.mark.parametrize("reopen", [{"min_regions": 1}, {"capacity_bytes": 2 * 1024 * 1024},
                                    {"capacity_bytes": 640 * 1024}])
def test_a_directory_keeps_its_scaled_regions_when_the_scaling_changes(disk_config: Config, kit: DiskKit,
                                                                      reopen: dict[str, int]) -> None:
    # Written as 16 regions of 64 KiB; reopened where the configuration scales to 256 KiB (no scaling, or a
    # doubled capacity: the daemon's default capacity follows the drive's free space) or to 40 KiB (a
    # smaller capacity). The blocks stay readable, and the tier goes on in 64 KiB regions.
    with DiskTier(disk_config(min_regions=16), kit.layout) as tier:
        kit.fill(tier, range(30))
        tier.flush()
    with DiskTier(disk_config(**{"min_regions": 16, **reopen}), kit.layout) as tier:
        assert tier.config.region_bytes == 64 * 1024
        assert tier.capacity_blocks == reopen.get("capacity_bytes", 1024 * 1024) // (64 * 1024) * 3
        kit.assert_holds(tier, range(min(30, tier.capacity_blocks // 3 * 3)))
        kit.fill(tier, range(100, 100 + tier.capacity_blocks))  # and it cycles in them
        tier.flush()
        kit.assert_holds(tier, range(100 + tier.capacity_blocks - 3, 100 + tier.capacity_blocks))


def test_regions_larger_than_region_bytes_or_the_capacity_are_refused_or_wiped(disk_config: Config,
                                                                               kit: DiskKit) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:  # 256 KiB regions
        kit.fill(tier, range(13))
        tier.flush()
    with pytest.raises(DiskError, match=r"region_bytes=262144 .* region_bytes=131072"):
        DiskTier(disk_config(region_bytes=128 * 1024), kit.layout)  # an explicit bound below the directory's
    with pytest.raises(DiskError, match=r"region_bytes=262144 .* region_bytes=131072"):
        DiskTier(disk_config(capacity_bytes=128 * 1024, region_bytes=128 * 1024), kit.layout)
    with DiskTier(disk_config(region_bytes=128 * 1024, wipe_incompatible=True), kit.layout) as tier:
        assert tier.config.region_bytes == 128 * 1024 and tier.stats().used_blocks == 0


def test_region_scaling_never_goes_below_one_entry(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(min_regions=1000), kit.layout) as tier:
        assert tier.config.region_bytes == 20 * 1024 and tier.capacity_blocks == 51
        kit.fill(tier, range(60))
        kit.assert_holds(tier, range(9, 60))


def test_a_single_region_tier_still_cycles(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(capacity_bytes=kit.region, reinsert_hits=0), kit.layout) as tier:
        kit.fill(tier, range(3 * kit.per_region))
        tier.flush()
        assert not tier.contains(kit.key(0)) and tier.stats().regions_evicted == 2
        kit.assert_holds(tier, range(2 * kit.per_region, 3 * kit.per_region))


def test_admission_decides_and_sees_accesses(disk_config: Config, kit: DiskKit) -> None:
    admission = kit.admission(lambda k: k != kit.key(1))
    with DiskTier(disk_config(), kit.layout, admission) as tier:
        assert tier.offer(kit.key(0), kit.payload(0)) and not tier.offer(kit.key(1), kit.payload(1))
        assert tier.offer(kit.key(0), kit.payload(0))  # already stored: not offered to the policy again
        tier.on_access([kit.key(0), kit.key(1)], [True, False])
        assert admission.offered == [kit.key(0), kit.key(1)]
        assert admission.accesses == [(kit.key(0), True), (kit.key(1), False)]
        assert tier.stats().admissions_rejected == 1
        with pytest.raises(InvalidInputError):
            tier.on_access([kit.key(0)], [])


def test_write_budget_rejects_blocks_over_it() -> None:
    now = [0.0]
    bucket = _TokenBucket(rate=1000, burst=5000, clock=lambda: now[0])
    assert bucket.take(5000) and not bucket.take(1)
    now[0] = 2.0
    assert bucket.take(2000) and not bucket.take(1)
    assert bucket.take(10_000, force=True) and bucket.tokens < 0


def test_tier_counts_budget_rejections(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(write_budget_bytes_per_s=1), kit.layout) as tier:  # a burst of one entry, then ~nothing
        assert tier.offer(kit.key(0), kit.payload(0)) and not tier.offer(kit.key(1), kit.payload(1))
        assert tier.stats().budget_rejected == 1


def test_write_budget_saves_up_for_a_burst_against_the_named_drive(disk_config: Config, kit: DiskKit) -> None:
    # 0.5 DWPD of a 2,304,000-byte drive is 13.33 B/s; an hour of it (48,000 bytes) pays for two 20 KiB
    # entries at once. Before, the bucket held one second: one entry, then refusals.
    config = disk_config(write_budget_dwpd=0.5, drive_bytes=2_304_000)
    assert config.budget_bytes_per_s == 13
    with DiskTier(config, kit.layout) as tier:
        assert all(tier.offer(kit.key(i), kit.payload(i)) for i in range(2))
        assert not tier.offer(kit.key(2), kit.payload(2))
        assert tier.stats().budget_rejected == 1
    # Without drive_bytes the DWPD counts the tier's own files (4 regions of 256 KiB).
    assert disk_config(write_budget_dwpd=1.0).budget_bytes_per_s == 4 * kit.region // 86_400


def test_drop_forgets_a_block_in_memory_and_on_disk(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:
        kit.fill(tier, range(14))
        tier.drop(kit.key(0))  # sealed region on disk
        tier.drop(kit.key(13))  # open region in memory
        tier.drop(kit.key(99))  # unknown: nothing happens
        tier.flush()
        assert kit.read(tier, 0) is None and kit.read(tier, 13) is None
    with DiskTier(disk_config(), kit.layout) as tier:
        assert not tier.contains(kit.key(0)) and not tier.contains(kit.key(13)) and tier.contains(kit.key(1))


def test_striped_paths_and_zstd(tmp_path: Path, kit: DiskKit) -> None:
    paths = (str(tmp_path / "a"), str(tmp_path / "b"))
    cfg = DiskConfig(paths=paths, capacity_bytes=2 * kit.region, region_bytes=kit.region, min_regions=1,
                     codec="zstd")
    kv = [torch.randn(kit.block // 2, generator=torch.Generator().manual_seed(i)).round(decimals=1)
          .to(torch.bfloat16).view(torch.uint8)
          for i in range(40)]
    with DiskTier(cfg, kit.layout) as tier:
        for i, block in enumerate(kv):
            assert tier.offer(kit.key(i), block)
        tier.flush()
        written = tier.stats().bytes_written
        assert written < 40 * (kit.block + 4096)  # compressed entries take fewer pages
    assert all((Path(p) / "kvtier-data.bin").stat().st_size == 2 * kit.region for p in paths)
    with DiskTier(DiskConfig(paths=paths, capacity_bytes=2 * kit.region, region_bytes=kit.region, min_regions=1),
                  kit.layout) as tier:
        dst = aligned_tensor(kit.block)
        for i, block in enumerate(kv):  # codec "none" now: zstd entries still decode
            assert tier.read_into(kit.key(i), dst) and torch.equal(dst, block)


def test_submit_read_runs_on_the_pool(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:
        kit.fill(tier, range(24))
        tier.flush()
        dsts = [aligned_tensor(kit.block) for _ in range(25)]
        futures = [tier.submit_read(kit.key(i), dsts[i]) for i in range(25)]
        assert [f.result() for f in futures] == [True] * 24 + [False]
        assert all(torch.equal(dsts[i], kit.payload(i)) for i in range(24))


def test_concurrent_offers_reads_and_evictions(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(reinsert_hits=1), kit.layout) as tier:  # 48 blocks of room for 180 offered
        errors: list[BaseException] = []

        def work(base: int) -> None:
            try:
                for i in range(base, base + 60):
                    tier.offer(kit.key(i), kit.payload(i))
                    for j in (i, max(base, i - 7), base):  # recent, older, hot: in memory, on disk, evicted
                        got = kit.read(tier, j)
                        assert got is None or torch.equal(got, kit.payload(j))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = tier.stats()
        assert not errors and stats.checksum_failures == 0
        assert stats.regions_evicted > 0 and stats.blocks_reinserted > 0
        tier.flush()
        offered = [i for n in range(3) for i in range(n * 1000, n * 1000 + 60)]
        held = [i for i in offered if tier.contains(kit.key(i))]
        assert len(held) >= kit.per_region  # at least a region's worth survived the evictions
    with DiskTier(disk_config(), kit.layout) as tier:
        # Every block held at the flush before closing is back after the restart, with its bytes.
        for i in held:
            got = kit.read(tier, i)
            assert got is not None and torch.equal(got, kit.payload(i)), i
        for i in set(offered) - set(held):
            got = kit.read(tier, i)
            assert got is None or torch.equal(got, kit.payload(i))
        assert tier.stats().checksum_failures == 0


def test_bad_arguments_are_refused(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:
        with pytest.raises(InvalidInputError):
            tier.offer(b"short", kit.payload(0))
        with pytest.raises(InvalidInputError):
            tier.offer(kit.key(0), kit.payload(0)[:100])
        with pytest.raises(InvalidInputError):
            tier.read_into(kit.key(0), aligned_tensor(kit.block + 4096)[1:])  # not page-aligned
        with pytest.raises(InvalidInputError):
            tier.submit_read(kit.key(0), aligned_tensor(100))
    with pytest.raises(Exception, match="region_bytes"):
        DiskTier(disk_config(region_bytes=16 * 1024, capacity_bytes=kit.region), kit.layout)


def test_close_is_idempotent_and_later_calls_raise(disk_config: Config, kit: DiskKit) -> None:
    tier = DiskTier(disk_config(), kit.layout)
    tier.close()
    tier.close()
    for call in (lambda: tier.contains(kit.key(0)), lambda: tier.offer(kit.key(0), kit.payload(0)), tier.flush,
                 lambda: tier.read_into(kit.key(0), aligned_tensor(kit.block)), lambda: tier.drop(kit.key(0))):
        with pytest.raises(ClosedError):
            call()


def test_a_directory_is_locked_while_open(disk_config: Config, kit: DiskKit) -> None:
    tier = DiskTier(disk_config(), kit.layout)
    with pytest.raises(DirectoryLockedError):
        DiskTier(disk_config(), kit.layout)
    tier.close()
    DiskTier(disk_config(), kit.layout).close()


def test_foreign_layout_version_or_geometry_is_refused_unless_wiped(disk_config: Config, kit: DiskKit,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:
        kit.fill(tier, range(13))
        tier.flush()
    other = KVLayout(num_layers=4, num_kv_heads=1, head_dim=64, dtype="bfloat16", block_tokens=16)
    with pytest.raises(LayoutMismatchError):
        DiskTier(disk_config(), other)
    with pytest.raises(DiskError, match="region_bytes"):
        DiskTier(disk_config(region_bytes=kit.region // 2), kit.layout)
    monkeypatch.setattr(tier_module, "FORMAT_VERSION", 99)
    with pytest.raises(FormatVersionError):
        DiskTier(disk_config(), kit.layout)
    with DiskTier(disk_config(wipe_incompatible=True), kit.layout) as tier:
        assert tier.stats().used_blocks == 0
        kit.fill(tier, range(1))
        tier.flush()
    monkeypatch.undo()
    with pytest.raises(FormatVersionError):
        DiskTier(disk_config(), kit.layout)


def test_growing_the_capacity_keeps_the_blocks(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(), kit.layout) as tier:
        kit.fill(tier, range(24))
        tier.flush()
    with DiskTier(disk_config(capacity_bytes=8 * kit.region), kit.layout) as tier:
        assert tier.capacity_blocks == 8 * kit.per_region
        kit.assert_holds(tier, range(24))
    # Shrinking drops the regions past the new end.
    with DiskTier(disk_config(capacity_bytes=kit.region), kit.layout) as tier:
        assert tier.stats().used_blocks == kit.per_region
        kit.assert_holds(tier, range(kit.per_region))


def test_an_exclusive_read_drops_the_disk_copy_and_the_host_eviction_offers_it_again(disk_config: Config,
                                                                                     kit: DiskKit) -> None:
    admission = kit.admission(exclusive=True)
    with DiskTier(disk_config(), kit.layout, admission) as tier:
        kit.fill(tier, range(2 * kit.per_region))
        tier.flush()
        assert kit.read(tier, 3) is not None  # promoted: host RAM committed its copy, then tells the tier
        assert tier.moved_to_host(kit.key(3)) and not tier.contains(kit.key(3)) and kit.read(tier, 3) is None
        assert not tier.moved_to_host(kit.key(3))  # no copy left to drop
        kit.fill(tier, range(3, 4))  # host RAM evicts it: offered, admitted and written again
        assert admission.offered.count(kit.key(3)) == 2
        tier.flush()
        admission.exclusive = False
        assert not tier.moved_to_host(kit.key(4)) and tier.contains(kit.key(4))  # inclusive: the copy stays
        assert tier.stats().blocks_moved_to_host == 1
    with DiskTier(disk_config(), kit.layout) as tier:  # the index recorded the drop, then the new copy
        kit.assert_holds(tier, range(2 * kit.per_region))


def test_a_sealed_region_left_without_a_live_block_is_free_at_once(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(reinsert_hits=0), kit.layout, kit.admission(exclusive=True)) as tier:
        kit.fill(tier, range(4 * kit.per_region))  # every region used, the last one open
        tier.flush()
        for i in range(kit.per_region - 1):
            assert tier.moved_to_host(kit.key(i))
        assert tier.stats().regions_freed == 0  # one live block left in the oldest region
        tier.drop(kit.key(kit.per_region - 1))  # any removal frees it
        assert tier.stats().regions_freed == 1
        kit.fill(tier, range(100, 100 + kit.per_region))  # into the freed region: nothing else is evicted
        assert tier.stats().regions_evicted == 0
        kit.assert_holds(tier, range(kit.per_region, 4 * kit.per_region))
        tier.flush()
    with DiskTier(disk_config(), kit.layout) as tier:
        assert not any(tier.contains(kit.key(i)) for i in range(kit.per_region))
        kit.assert_holds(tier, range(kit.per_region, 4 * kit.per_region))
        kit.assert_holds(tier, range(100, 100 + kit.per_region))


def test_a_key_dropped_and_offered_again_in_one_region(disk_config: Config, kit: DiskKit) -> None:
    with DiskTier(disk_config(reinsert_hits=0), kit.layout) as tier:
        kit.fill(tier, range(2))
        tier.drop(kit.key(0))
        kit.fill(tier, range(1))  # listed twice in the open region
        kit.fill(tier, range(100, 100 + 5 * kit.per_region))  # the region is written, then evicted
        assert not tier.contains(kit.key(0)) and tier.stats().regions_evicted == 2
    with DiskTier(disk_config(), kit.layout) as tier:
        assert not tier.contains(kit.key(0))


class RecordedAdmission:
    """A real admission policy, with every answer it gave recorded."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.name = policy.name
        self.answers: dict[Hashable, bool] = {}

    def on_access(self, key: Hashable, hit: bool) -> None:
        self.policy.on_access(key, hit)

    def admit(self, key: Hashable) -> bool:
        self.answers[key] = bool(self.policy.admit(key))
        return self.answers[key]


@pytest.mark.parametrize("name", ["admit_all", "reject_first", "adaptive"])
def test_the_real_admission_policies_plug_in(disk_config: Config, kit: DiskKit, name: str) -> None:
    with DiskTier(disk_config(), kit.layout) as probe:
        capacity = probe.capacity_blocks
    admission = RecordedAdmission(make_admission(name, capacity))
    with DiskTier(disk_config(), kit.layout, admission) as tier:
        for i in range(20):  # first sightings
            tier.on_access([kit.key(i)], [False])
            tier.offer(kit.key(i), kit.payload(i))
        admitted = {i for i in range(20) if admission.answers[kit.key(i)]}
        if name == "admit_all":
            assert admitted == set(range(20))
        if name == "reject_first":
            assert admitted == set()  # a key seen once is not written
        # The tier writes exactly what its policy admits, and reads it back; the rest is absent.
        stats = tier.stats()
        assert stats.used_blocks == len(admitted) and stats.admissions_rejected == 20 - len(admitted)
        for i in range(20):
            got = kit.read(tier, i)
            assert (got is not None and torch.equal(got, kit.payload(i))) if i in admitted else got is None
        for i in range(20):  # second sightings: reject_first admits them now
            tier.on_access([kit.key(i)], [tier.contains(kit.key(i))])
            if not tier.contains(kit.key(i)):
                tier.offer(kit.key(i), kit.payload(i))
        if name != "adaptive":
            assert all(tier.contains(kit.key(i)) for i in range(20))
        for i in range(20):
            got = kit.read(tier, i)
            assert got is None or torch.equal(got, kit.payload(i))


def test_contains_many_answers_as_contains_does_under_one_lock(disk_config: Config, kit: DiskKit) -> None:
    tier = DiskTier(disk_config(), kit.layout)
    kit.fill(tier, range(20))
    tier.flush()  # some blocks written and indexed, the rest still in the open region
    keys = [kit.key(i) for i in (0, 25, 19, 13, 40)]
    assert tier.contains_many(keys) == [tier.contains(key) for key in keys] == [True, False, True, True, False]
    assert tier.contains_many([]) == []
    tier.close()
    with pytest.raises(ClosedError):
        tier.contains_many(keys)
