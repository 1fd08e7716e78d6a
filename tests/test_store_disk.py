"""The store with a disk tier: demotion, promotion, write-through across a restart, corruption as a miss."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from support import random_blocks

from kvtier import (
    DiskConfig,
    HostConfig,
    KVLayout,
    LayoutMismatchError,
    Store,
    StoreConfig,
    Tier,
    TransferConfig,
)
from kvtier.disk.admission import AdmitAll
from kvtier.disk.device import FileDevice


def disk_store(layout: KVLayout, path: Path, num_slots: int = 4, **disk: object) -> Store:
    settings: dict[str, object] = {"paths": (str(path),), "capacity_bytes": "4MiB", "region_bytes": "256KiB",
                                   "admission": "admit_all", **disk}
    config = StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy="lru"),
                         disk=DiskConfig(**settings),  # type: ignore[arg-type]
                         transfer=TransferConfig(backend="cpu"))
    return Store(layout, config)


def keys_for(store: Store, count: int) -> list[bytes]:
    return store.hasher("disk-test").keys(list(range(count * store.layout.block_tokens)))


def read_all(store: Store, keys: list[bytes]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    out = [torch.full(store.layout.block_shape, float("nan")) for _ in keys]
    return out, store.get(keys, out).wait(30).failed


def test_host_evictions_are_demoted_and_promoted_back(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path) as store:
        keys = keys_for(store, 10)
        blocks = random_blocks(layout, 10)
        for start in range(0, 10, 2):
            assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
        found = store.lookup(keys)
        assert found.num_blocks == 10
        assert found.tiers[0] is Tier.DISK and found.tiers[-1] is Tier.HOST
        for start in range(0, 10, 4):  # the host tier holds 4 blocks: read in host-sized batches
            out, failed = read_all(store, keys[start : start + 4])
            assert failed == ()
            assert all(torch.equal(o, b) for o, b in zip(out, blocks[start : start + 4], strict=True))
        stats = store.stats()
        assert stats.tiers["host"].detail["demoted_blocks"] >= 6
        assert stats.tiers["host"].detail["promoted_blocks"] >= 1
        assert stats.tiers["disk"].used_blocks >= 6
        # The disk tier asks host RAM what it holds before reinserting (host and disk mostly exclusive).
        disk = store.disk
        assert disk is not None and disk.held_above is not None
        assert [disk.held_above(key) for key in keys] == [store.host.holds(key) for key in keys]
        assert any(disk.held_above(key) for key in keys) and not all(disk.held_above(key) for key in keys)


def test_an_exclusive_disk_drops_a_promoted_block_once_host_ram_holds_it(layout: KVLayout, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AdmitAll, "exclusive", True)  # the adaptive policy's answer where exclusivity pays
    with disk_store(layout, tmp_path) as store:
        disk = store.disk
        assert disk is not None
        keys = keys_for(store, 10)
        blocks = random_blocks(layout, 10)
        for start in range(0, 6, 2):  # a 4-slot host: blocks 0 and 1 go to disk
            assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
        assert [disk.contains(key) for key in keys[:2]] == [True, True]
        out, failed = read_all(store, keys[:2])  # promoted: committed in host RAM, then dropped from disk
        assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks[:2], strict=True))
        assert [disk.contains(key) for key in keys[:2]] == [False, False]
        assert store.contains(keys[0]) is Tier.HOST and disk.stats().blocks_moved_to_host == 2
        assert store.removed_since(0).keys == ()  # host RAM holds them: nothing left the store
        for start in range(6, 10, 2):  # 4 new blocks evict 0 and 1 again: offered to the disk again
            assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
        assert [store.contains(key) for key in keys[:2]] == [Tier.DISK, Tier.DISK]
        store.flush()
    monkeypatch.setattr(AdmitAll, "exclusive", False)
    with disk_store(layout, tmp_path) as store:  # the disk's second copies survive a restart
        out, failed = read_all(store, keys[:2])
        assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks[:2], strict=True))


def test_write_through_survives_a_restart(layout: KVLayout, tmp_path: Path) -> None:
    blocks = random_blocks(layout, 3)
    with disk_store(layout, tmp_path, write_mode="through") as store:
        keys = keys_for(store, 3)
        assert store.put(keys, blocks).wait().ok
    with disk_store(layout, tmp_path, write_mode="through") as store:
        assert store.lookup(keys).tiers == (Tier.DISK,) * 3
        out, failed = read_all(store, keys)
        assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks, strict=True))


def test_corrupt_disk_blocks_are_misses_never_data(layout: KVLayout, tmp_path: Path) -> None:
    blocks = random_blocks(layout, 3)
    with disk_store(layout, tmp_path, write_mode="through") as store:
        keys = keys_for(store, 3)
        store.put(keys, blocks).wait()
    data_files = [p for p in tmp_path.iterdir() if p.is_file() and p.suffix == ".bin"]
    assert data_files
    with data_files[0].open("r+b") as file:
        raw = bytearray(file.read())
        for offset in range(100, len(raw), 4096):  # one flipped byte in every page
            raw[offset] ^= 0xFF
        file.seek(0)
        file.write(raw)
    with disk_store(layout, tmp_path, write_mode="through") as store:
        out, failed = read_all(store, keys)
        assert failed == (0, 1, 2)
        assert all(torch.isnan(o).all() for o in out)  # nothing was written into the caller's tensors
        assert store.stats().tiers["disk"].detail["checksum_failures"] >= 1


def test_a_directory_of_another_layout_is_refused(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path) as store:
        store.flush()
    other = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    with pytest.raises(LayoutMismatchError):
        disk_store(other, tmp_path)


def test_lookup_prefetch_never_evicts_the_prefix_it_looks_up(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path) as store:
        keys = keys_for(store, 6)
        blocks = random_blocks(layout, 6)
        for start in range(0, 6, 2):  # a 4-slot host: blocks 0 and 1 go to disk, LRU order 2, 3, 4, 5
            assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
        assert [store.contains(key) for key in keys[:4]] == [Tier.DISK, Tier.DISK, Tier.HOST, Tier.HOST]
        assert store.lookup(keys[:4]).num_blocks == 4
        # Promoting blocks 0 and 1 takes the slots of 4 and 5, never of 2 and 3 (the prefix's own).
        assert store.contains(keys[2]) is Tier.HOST and store.contains(keys[3]) is Tier.HOST
        lease = store.acquire(keys[:4], timeout=30)
        try:
            assert lease.keys == tuple(keys[:4])
            assert all(torch.equal(store.slot_view(slot).view(layout.block_shape), block)
                       for slot, block in zip(lease.slots, blocks[:4], strict=True))
        finally:
            store.release(lease)
        assert store.stats().tiers["host"].detail["promoted_blocks"] == 2


def test_a_get_after_a_promotion_is_ordered_after_the_requesting_threads_work(layout: KVLayout,
                                                                             tmp_path: Path) -> None:
    """The copy after a promotion is submitted from an I/O thread: it carries the fence the get took."""
    from kvtier.transfer import CpuTransferEngine

    class Fencing(CpuTransferEngine):
        def __init__(self) -> None:
            super().__init__(1)
            self.fences: list[tuple[int, object]] = []
            self.afters: list[object | None] = []

        def fence(self, tensors: Any) -> object | None:
            mark = object()
            self.fences.append((threading.get_ident(), mark))
            return mark

        def submit_blocks(self, rows: Any, slots: Any, blocks: Any, direction: Any, on_done: Any, *,
                          after: object | None = None) -> Any:
            self.afters.append(after)
            return super().submit_blocks(rows, slots, blocks, direction, on_done)

    with disk_store(layout, tmp_path) as store:
        keys = keys_for(store, 8)
        blocks = random_blocks(layout, 8)
        for start in range(0, 8, 2):
            assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
        engine = Fencing()
        store.transfer, plain = engine, store.transfer
        plain.close()
        out, failed = read_all(store, keys[:2])  # evicted to disk long ago: promoted first
        assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks[:2], strict=True))
        assert [ident for ident, _ in engine.fences] == [threading.get_ident()]
        assert engine.afters and all(after is engine.fences[0][1] for after in engine.afters)


def test_reinsertion_never_reads_the_drive_under_the_store_lock(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path, capacity_bytes="1MiB", reinsert_hits=1) as store:
        disk = store.disk
        assert disk is not None
        per_region = disk.capacity_blocks // 4
        keys = keys_for(store, 6 * per_region)
        blocks = random_blocks(layout, 4)
        first = keys[: 3 * per_region]  # a region stays clean: the reads below demote without evicting
        for start in range(0, len(first), 4):
            assert store.put(first[start : start + 4], blocks).wait(30).ok
        store.flush()
        for start in range(0, per_region, 4):  # the oldest region's blocks become hot (one read each)
            assert read_all(store, first[start : start + 4])[1] == ()
        device = disk._devices[0]
        read = device.read
        under_lock: list[int] = []

        def watched_read(offset: int, buffers: object) -> int:
            if store._lock._is_owned():  # type: ignore[attr-defined]
                under_lock.append(offset)
            return read(offset, buffers)  # type: ignore[arg-type]

        device.read = watched_read  # type: ignore[method-assign]
        rest = keys[3 * per_region :]
        for start in range(0, len(rest), 4):  # demotions wrap the disk: the hot region is evicted
            store.put(rest[start : start + 4], blocks).wait(30)
        store.flush()
        assert under_lock == []
        assert disk.stats().regions_evicted >= 1 and disk.stats().blocks_reinserted >= 1


def test_a_write_through_waiting_for_the_disk_holds_no_call(layout: KVLayout, tmp_path: Path) -> None:
    """Issue 25: a write-through waiting for the disk tier (held busy here) holds no caller: the commit
    returns (its blocks are queued) and another thread leases a host block meanwhile."""
    with disk_store(layout, tmp_path, write_mode="through") as store:
        keys = keys_for(store, 2)
        assert store.put(keys[:1], random_blocks(layout, 1)).wait(30).ok
        store.flush()
        reservation = store.reserve(keys[1:])
        disk = store.disk
        assert disk is not None
        leases: list[Any] = []
        with disk._lock:
            committing = threading.Thread(target=store.commit, args=(reservation,), daemon=True)
            committing.start()
            committing.join(10)
            returned = not committing.is_alive()
            leasing = threading.Thread(target=lambda: leases.append(store.acquire(keys[:1])), daemon=True)
            leasing.start()
            leasing.join(10)
            answered = not leasing.is_alive()
        committing.join(30)
        leasing.join(30)
        assert returned, "a commit waited for the disk tier"
        assert answered, "a lease waited behind another thread's write-through"
        assert leases[0].keys == (keys[0],)
        store.release(leases[0])
        store.flush()
        assert store.lookup(keys).num_blocks == 2 and disk.contains(keys[1])


def test_a_slow_disk_read_never_holds_the_store_lock(layout: KVLayout, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion reads a block of the disk's oldest region and the drive is slow to answer; puts meanwhile
    demote into the full disk under the store's lock. Their room would evict that region: they are refused
    (``busy_rejected``) rather than wait for the read, so another thread's lookup is answered at once."""
    gate, armed, entered = threading.Event(), threading.Event(), threading.Event()
    real = FileDevice._preadv

    def slow_preadv(device: FileDevice, offset: int, buffers: list[memoryview]) -> int:
        if armed.is_set():
            entered.set()
            gate.wait(30)
        return real(device, offset, buffers)

    monkeypatch.setattr(FileDevice, "_preadv", slow_preadv)
    with disk_store(layout, tmp_path, num_slots=2, capacity_bytes="128KiB", region_bytes="32KiB", min_regions=1,
                    reinsert_hits=0) as store:
        disk = store.disk
        assert disk is not None
        keys = keys_for(store, 40)
        blocks = random_blocks(layout, 40)
        for i in range(18):  # 16 demoted: the disk's regions full
            assert store.put([keys[i]], [blocks[i]]).wait(10).ok
        store.flush()
        # Its demotion opens a region (the oldest evicted) with room for the promotion's own demotion below.
        assert store.put([keys[18]], [blocks[18]]).wait(10).ok
        oldest = next(i for i in range(19) if disk.contains(keys[i]))
        armed.set()
        try:
            store.lookup([keys[oldest]])  # its promotion reads from the oldest region; the drive hangs
            assert entered.wait(5)
            putting = threading.Thread(target=lambda: [store.put([keys[i]], [blocks[i]]).wait(30)
                                                       for i in range(19, 24)], daemon=True)
            putting.start()
            putting.join(5)
            looking = threading.Thread(target=store.lookup, args=([keys[30]],), daemon=True)
            looking.start()
            looking.join(5)
            assert not putting.is_alive() and not looking.is_alive(), "a call waited behind a slow disk read"
            assert disk.stats().busy_rejected >= 1
        finally:
            gate.set()
        _, failed = read_all(store, [keys[oldest]])
        assert failed == ()
