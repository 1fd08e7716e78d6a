"""The write-through queue with a real disk tier: commits return before the disk copy, back-pressure with a
deadline, flush and close, a queued block's slot kept until copied, and a failing offer counted."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support import random_blocks

import kvtier.store
from kvtier import DiskConfig, HostConfig, KVLayout, Store, StoreConfig, Tier, TransferConfig
from kvtier.errors import DiskFullError, FlushTimeoutError
from kvtier.tiers.disk import DiskAdapter

# Generous bounds on waits that end at once when the code is right: they only keep a broken build from hanging.
WAIT_S = 30.0


def through_store(layout: KVLayout, path: Path, num_slots: int = 8, **host: object) -> Store:
    config = StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy="lru", **host),  # type: ignore[arg-type]
                         disk=DiskConfig(paths=(str(path),), capacity_bytes="4MiB", region_bytes="256KiB",
                                         admission="admit_all", write_mode="through"),
                         transfer=TransferConfig(backend="cpu"))
    return Store(layout, config)


def keys_for(store: Store, count: int, model: str = "through-test") -> list[bytes]:
    return store.hasher(model).keys(list(range(count * store.layout.block_tokens)))


def commit(store: Store, keys: list[bytes], blocks: list[torch.Tensor]) -> None:
    """Write ``blocks`` through the zero-copy path and commit them (on this thread)."""
    reservation = store.reserve(keys)
    for slot, block in zip(reservation.slots, blocks, strict=True):
        store.slot_view(slot).copy_(block.reshape(-1))
    store.commit(reservation)


def read(store: Store, keys: list[bytes]) -> list[torch.Tensor]:
    out = [torch.full(store.layout.block_shape, float("nan")) for _ in keys]
    assert store.get(keys, out).wait(WAIT_S).ok
    return out


def in_thread(call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


class Gate:
    """Holds the disk tier's waiting offers (the write-throughs; demotions pass) until ``opened``."""

    def __init__(self, adapter: DiskAdapter) -> None:
        self._offer = adapter.offer
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.threads: list[str] = []
        self.payloads: dict[bytes, torch.Tensor] = {}

    def __call__(self, key: bytes, payload: torch.Tensor, *, wait: bool = False,
                 release: Callable[[], None] | None = None) -> bool:
        if wait:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.opened.wait(WAIT_S)
            self.payloads[key] = payload.clone()  # what the disk tier is about to copy
        return self._offer(key, payload, wait=wait, release=release)


@pytest.fixture
def gated(layout: KVLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, Gate]]:
    store = through_store(layout, tmp_path)
    adapter = store.lower.get("disk")
    assert isinstance(adapter, DiskAdapter)
    gate = Gate(adapter)
    monkeypatch.setattr(adapter, "offer", gate)
    yield store, gate
    gate.opened.set()
    store.close()


def test_commit_returns_before_the_disk_copy(gated: tuple[Store, Gate]) -> None:
    store, gate = gated
    keys, blocks = keys_for(store, 2), random_blocks(store.layout, 2)
    committing = in_thread(lambda: commit(store, keys, blocks))
    committing.join(WAIT_S)
    assert not committing.is_alive(), "the commit waited for the disk copy"
    assert gate.entered.wait(WAIT_S)
    assert gate.threads == ["kvtier-write-through"]
    # Queued blocks are host blocks: found and read meanwhile.
    assert store.lookup(keys).tiers == (Tier.HOST, Tier.HOST)
    assert all(torch.equal(o, b) for o, b in zip(read(store, keys), blocks, strict=True))
    assert store.stats().tiers["host"].detail["write_through_queued_blocks"] == 2
    gate.opened.set()
    store.flush()
    disk = store.disk
    assert disk is not None and all(disk.contains(key) for key in keys)
    assert store.stats().tiers["host"].detail["pinned_blocks"] == 0


def test_flush_waits_for_the_queue_and_a_restart_finds_the_blocks(layout: KVLayout, tmp_path: Path,
                                                                  gated: tuple[Store, Gate]) -> None:
    store, gate = gated
    keys, blocks = keys_for(store, 3), random_blocks(layout, 3)
    commit(store, keys, blocks)
    assert gate.entered.wait(WAIT_S)
    flushed = threading.Event()
    flushing = in_thread(lambda: (store.flush(), flushed.set()))
    assert not flushed.wait(0.2), "flush returned with blocks still queued"
    gate.opened.set()
    flushing.join(WAIT_S)
    assert flushed.is_set()
    disk = store.disk
    assert disk is not None and all(disk.contains(key) for key in keys)
    store.close()
    with through_store(layout, tmp_path) as reopened:
        assert reopened.lookup(keys).tiers == (Tier.DISK,) * 3
        assert all(torch.equal(o, b) for o, b in zip(read(reopened, keys), blocks, strict=True))


def test_a_flush_past_its_deadline_raises_and_a_later_flush_finds_the_blocks(
        layout: KVLayout, tmp_path: Path, gated: tuple[Store, Gate]) -> None:
    store, gate = gated
    keys, blocks = keys_for(store, 2), random_blocks(layout, 2)
    commit(store, keys, blocks)
    assert gate.entered.wait(WAIT_S)
    started = time.monotonic()
    with pytest.raises(FlushTimeoutError):
        store.flush(timeout_s=0.2)
    assert time.monotonic() - started < 5
    gate.opened.set()
    store.flush()
    disk = store.disk
    assert disk is not None and all(disk.contains(key) for key in keys)


def test_a_full_queue_holds_the_commit_until_room(layout: KVLayout, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # One slot of queue; a commit of three waits for the offers, within its deadline.
    with through_store(layout, tmp_path, write_through_queue_bytes=4096, write_through_wait_ms=60_000) as store:
        adapter = store.lower.get("disk")
        assert isinstance(adapter, DiskAdapter)
        gate = Gate(adapter)
        monkeypatch.setattr(adapter, "offer", gate)
        keys, blocks = keys_for(store, 3), random_blocks(layout, 3)
        done = threading.Event()
        committing = in_thread(lambda: (commit(store, keys, blocks), done.set()))
        assert gate.entered.wait(WAIT_S)
        assert not done.wait(0.2), "the commit did not wait for room in the queue"
        gate.opened.set()
        committing.join(WAIT_S)
        assert done.is_set()
        store.flush()
        assert store.stats().write_through_skipped_blocks == 0
        disk = store.disk
        assert disk is not None and all(disk.contains(key) for key in keys)


def test_past_the_deadline_blocks_are_skipped_kept_in_host_and_demoted_later(layout: KVLayout, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with through_store(layout, tmp_path, num_slots=4, write_through_queue_bytes=4096,
                       write_through_wait_ms=0) as store:
        adapter = store.lower.get("disk")
        assert isinstance(adapter, DiskAdapter)
        gate = Gate(adapter)
        monkeypatch.setattr(adapter, "offer", gate)
        keys, blocks = keys_for(store, 3), random_blocks(layout, 3)
        commit(store, keys[:1], blocks[:1])
        assert gate.entered.wait(WAIT_S)
        commit(store, keys[1:], blocks[1:])  # the queue is full (one slot, being offered): skipped at once
        stats = store.stats()
        assert stats.write_through_skipped_blocks == 2
        assert stats.tiers["host"].detail["pinned_blocks"] == 1  # only the block being offered
        assert all(torch.equal(o, b) for o, b in zip(read(store, keys), blocks, strict=True))
        gate.opened.set()
        store.flush()
        disk = store.disk
        assert disk is not None and [disk.contains(key) for key in keys] == [True, False, False]
        # Host evictions demote the skipped blocks, as in write-back mode: nothing is lost.
        others = keys_for(store, 8, "evictor")[4:]
        assert store.put(others, random_blocks(layout, 4, seed=1)).wait(WAIT_S).ok
        store.flush()
        assert all(disk.contains(key) for key in keys)
        assert all(torch.equal(o, b) for o, b in zip(read(store, keys), blocks, strict=True))


def test_a_queued_block_is_not_evicted_before_it_was_copied(layout: KVLayout, tmp_path: Path,
                                                            gated: tuple[Store, Gate]) -> None:
    store, gate = gated
    key, block = keys_for(store, 1), random_blocks(layout, 1)
    commit(store, key, block)
    assert gate.entered.wait(WAIT_S)
    # Cycle the host pool (8 slots) twice over: every other block is evicted, the queued one stays.
    for start in range(0, 16, 4):
        others = keys_for(store, 20, "evictor")[start + 4 : start + 8]
        store.put(others, random_blocks(layout, 4, seed=start)).wait(WAIT_S)
    assert store.contains(key[0]) is Tier.HOST
    gate.opened.set()
    store.flush()
    assert torch.equal(gate.payloads[key[0]].view(torch.float32).reshape(layout.block_shape), block[0])
    store.close()
    with through_store(layout, tmp_path) as reopened:
        assert torch.equal(read(reopened, key)[0], block[0])


def test_a_key_stored_or_forgotten_while_queued_corrupts_nothing(layout: KVLayout, tmp_path: Path,
                                                                gated: tuple[Store, Gate]) -> None:
    store, gate = gated
    keys, blocks = keys_for(store, 2), random_blocks(layout, 2)
    commit(store, keys, blocks)
    assert gate.entered.wait(WAIT_S)
    disk = store.disk
    assert disk is not None
    # Meanwhile the disk tier gets the first block by another way (its offer deduplicates the queued one),
    # and the scope's epoch advances (the keys become unreachable to callers, the bytes stay right).
    assert disk.offer(keys[0], blocks[0].reshape(-1).view(torch.uint8))
    epoch = store.advance_epoch("through-test")
    gate.opened.set()
    store.flush()
    assert disk.stats().used_blocks == 2
    store.close()
    with through_store(layout, tmp_path) as reopened:
        assert reopened.epoch("through-test") == epoch
        assert all(torch.equal(o, b) for o, b in zip(read(reopened, keys), blocks, strict=True))


def test_close_with_a_stuck_offer_ends_within_its_deadline(gated: tuple[Store, Gate],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    store, gate = gated
    monkeypatch.setattr(kvtier.store, "CLOSE_WAIT_S", 0.5)
    keys, blocks = keys_for(store, 2), random_blocks(store.layout, 2)
    commit(store, keys, blocks)
    assert gate.entered.wait(WAIT_S)
    with caplog.at_level(logging.WARNING, logger="kvtier.write_through"):
        closing = in_thread(store.close)
        closing.join(WAIT_S)
    assert not closing.is_alive(), "close hung on a stuck write-through"
    assert "not written through" in caplog.text
    assert store.stats().write_through_skipped_blocks == 1  # the queued one; the stuck one is still offered
    gate.opened.set()  # the stuck offer ends against a closed disk tier: a failure, counted
    through = store._through
    assert through is not None
    through._thread.join(WAIT_S)
    assert store.stats().write_through_failed_blocks == 1


def test_a_failing_offer_is_counted_unpins_and_the_thread_goes_on(layout: KVLayout, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with through_store(layout, tmp_path) as store:
        disk = store.disk
        assert disk is not None
        offer = disk.offer

        def full(key: bytes, payload: torch.Tensor, *, wait: bool = True) -> bool:
            raise DiskFullError("no space left (test)")

        monkeypatch.setattr(disk, "offer", full)
        keys, blocks = keys_for(store, 2), random_blocks(layout, 2)
        commit(store, keys[:1], blocks[:1])
        store.flush()
        stats = store.stats()
        assert stats.write_through_failed_blocks == 1
        assert stats.tiers["host"].detail["pinned_blocks"] == 0
        monkeypatch.setattr(disk, "offer", offer)
        commit(store, keys[1:], blocks[1:])
        store.flush()
        assert [disk.contains(key) for key in keys] == [False, True]
        assert store.stats().write_through_failed_blocks == 1
