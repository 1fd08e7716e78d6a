"""The store's removal log: the keys that left every tier, bounded, with a flag for a reader that fell behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import random_blocks
from test_store_disk import disk_store, keys_for

from kvtier import KVLayout, Store, StoreConfig
from kvtier.config import HostConfig, TransferConfig
from kvtier.errors import ClosedError, InvalidInputError
from kvtier.removals import RemovalLog


def host_store(layout: KVLayout, num_slots: int = 4) -> Store:
    config = StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy="lru"),
                         transfer=TransferConfig(backend="cpu"))
    return Store(layout, config)


def test_the_log_numbers_keys_and_keeps_the_last_ones() -> None:
    log = RemovalLog(capacity=3)
    assert log.since(0) == (first := log.since(0)) and first.next_seq == 0 and not first.keys
    log.record([b"a", b"b"])
    read = log.since(0)
    assert (read.next_seq, read.keys, read.overflowed) == (2, (b"a", b"b"), False)
    assert log.since(1).keys == (b"b",) and log.since(2).keys == ()
    log.record([b"c", b"d", b"e"])  # a and b fall out of the log
    behind = log.since(1)
    assert (behind.next_seq, behind.keys, behind.overflowed) == (5, (), True)
    assert log.since(2).overflowed is False and log.since(2).keys == (b"c", b"d", b"e")
    ahead = log.since(9)  # a sequence number of another log (a store that restarted)
    assert ahead.overflowed and ahead.keys == ()
    assert RemovalLog().log_id != log.log_id == behind.log_id


@pytest.mark.parametrize("seq", [-1, 1.5, "0", None, True])
def test_a_bad_sequence_number_is_invalid_input(seq: object) -> None:
    with pytest.raises(InvalidInputError, match="seq"):
        RemovalLog().since(seq)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at least one key"):
        RemovalLog(capacity=0)


def test_host_evictions_without_a_lower_tier_are_removals_in_order(layout: KVLayout) -> None:
    with host_store(layout) as store:
        start = store.removed_since(0).next_seq
        keys = store.hasher("removals").keys(list(range(6 * layout.block_tokens)))
        blocks = random_blocks(layout, 6)
        for i in range(6):
            assert store.put([keys[i]], [blocks[i]]).wait(30).ok
        removed = store.removed_since(start)
        assert removed.keys == tuple(keys[:2]) and not removed.overflowed  # LRU: the two oldest
        assert all(store.contains(key) is None for key in removed.keys)
        assert store.removed_since(removed.next_seq).keys == ()
    with pytest.raises(ClosedError):
        store.removed_since(0)


def test_demotion_is_not_removal_and_disk_evictions_are(layout: KVLayout, tmp_path: Path) -> None:
    # 1 MiB of 256 KiB regions: a few dozen blocks, so a hundred puts evict disk regions.
    with disk_store(layout, tmp_path, capacity_bytes="1MiB") as store:
        keys = keys_for(store, 40)
        blocks = random_blocks(layout, 40)
        for i in range(8):
            assert store.put([keys[i]], [blocks[i]]).wait(30).ok
        assert store.stats().tiers["host"].detail["demoted_blocks"] == 4
        assert store.removed_since(0).keys == ()  # the 4 evicted from the host are on disk
        more = keys_for(store, 400)[40:]
        more_blocks = random_blocks(layout, len(more), seed=1)
        for key, block in zip(more, more_blocks, strict=True):
            assert store.put([key], [block]).wait(30).ok
        store.flush()
        assert store.stats().tiers["disk"].evicted_blocks > 0
        removed = store.removed_since(0)
        assert not removed.overflowed and len(set(removed.keys)) == len(removed.keys)
        gone = {key for key in keys[:8] + more if store.contains(key) is None}
        assert gone and set(removed.keys) == gone
