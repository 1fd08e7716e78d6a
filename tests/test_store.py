from __future__ import annotations

from typing import Any

import pytest
import torch
from support import StoreFactory, random_blocks

from kvtier import (
    CapacityError,
    ClosedError,
    ConfigError,
    HostConfig,
    InvalidInputError,
    KVLayout,
    Store,
    StoreConfig,
    Tier,
    TransferConfig,
)
from kvtier.errors import TransferError
from kvtier.transfer import CpuTransferEngine, Transfer


def keys_for(store: Store, num_blocks: int, first_token: int = 0) -> list[bytes]:
    tokens = list(range(first_token, first_token + num_blocks * store.layout.block_tokens))
    return store.hasher("test-model").keys(tokens)


def test_put_lookup_get_round_trip(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 5)
    blocks = random_blocks(layout, 5)
    assert store.put(keys, blocks).wait().ok
    found = store.lookup(keys)
    assert found.num_blocks == 5 and found.tiers == (Tier.HOST,) * 5
    out = [torch.empty(layout.block_numel) for _ in keys]  # flat destinations are accepted too
    assert store.get(keys, out).wait().ok
    assert all(torch.equal(o.view(layout.block_shape), b) for o, b in zip(out, blocks, strict=True))


def test_lookup_is_the_leading_run(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 4)
    store.put([keys[0], keys[1], keys[3]], random_blocks(layout, 3)).wait()
    assert store.lookup(keys).num_blocks == 2
    assert store.lookup(keys[2:]).num_blocks == 0
    stats = store.stats()
    assert (stats.lookups, stats.hit_blocks, stats.miss_blocks) == (2, 2, 4)


def test_lookup_acquire_is_a_lookup_then_an_acquire_of_its_run(make_store: StoreFactory, layout: KVLayout) -> None:
    """In one pass where the run is in host: the same result, pins and counters as the two calls."""
    one, two = make_store(), make_store()
    for store in (one, two):
        keys = keys_for(store, 4)
        store.put([keys[0], keys[1], keys[3]], random_blocks(layout, 3)).wait()
    keys = keys_for(one, 4)
    found, lease = one.lookup_acquire(keys)
    expected_found = two.lookup(keys)
    expected_lease = two.acquire(keys[: expected_found.num_blocks])
    assert (found, lease.keys, lease.slots) == (expected_found, expected_lease.keys, expected_lease.slots)
    assert found.num_blocks == 2 and one.stats() == two.stats()
    with pytest.raises(InvalidInputError):  # pinned: nothing can take the slots until released
        one.host.reserve([keys[0]])
    one.release(lease)
    two.release(expected_lease)
    assert one.host.stats().pinned_blocks == 0
    empty_found, empty = one.lookup_acquire(keys[2:3])
    assert (empty_found.num_blocks, empty.slots) == (0, ())
    with pytest.raises(InvalidInputError):
        one.lookup_acquire([keys[0], keys[0]])
    one.close()
    with pytest.raises(ClosedError):
        one.lookup_acquire(keys)


def test_put_deduplicates(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 2)
    first = random_blocks(layout, 2, seed=1)
    store.put(keys, first).wait()
    assert store.put(keys, random_blocks(layout, 2, seed=2)).wait().ok
    out = [torch.empty(layout.block_shape) for _ in keys]
    store.get(keys, out).wait()
    assert torch.equal(out[0], first[0])  # the first copy stays
    assert store.stats().put_deduplicated_blocks == 2 and store.stats().put_blocks == 2


def test_get_reports_missing_blocks(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 3)
    store.put(keys[:1], random_blocks(layout, 1)).wait()
    result = store.get(keys, [torch.empty(layout.block_shape) for _ in keys]).wait()
    assert result.failed == (1, 2) and result.num_succeeded == 1
    assert store.stats().get_failed_blocks == 2


def test_capacity_is_never_exceeded_and_prefix_wins(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store(num_slots=4)
    keys = keys_for(store, 6)
    result = store.put(keys, random_blocks(layout, 6)).wait()
    assert result.failed == (4, 5)  # the prefix got the slots
    assert store.stats().tiers["host"].used_blocks == 4
    more = keys_for(store, 2, first_token=1000)
    store.put(more, random_blocks(layout, 2)).wait()  # evicts two old ones
    stats = store.stats()
    assert stats.tiers["host"].used_blocks == 4 and stats.tiers["host"].evicted_blocks == 2


def test_blocks_being_read_are_not_evicted(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store(num_slots=2)
    keys = keys_for(store, 2)
    blocks = random_blocks(layout, 2)
    store.put(keys, blocks).wait()
    lease = store.acquire(keys)
    assert lease.keys == tuple(keys)
    with pytest.raises(CapacityError):
        store.reserve(keys_for(store, 1, first_token=500))
    assert store.put(keys_for(store, 1, first_token=500), random_blocks(layout, 1)).wait().failed == (0,)
    store.release(lease)
    assert store.put(keys_for(store, 1, first_token=500), random_blocks(layout, 1)).wait().ok


def test_zero_copy_reserve_commit_abort(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 3)
    reservation = store.reserve(keys[:2])
    assert store.lookup(keys).num_blocks == 0  # written blocks are not readable before commit
    for slot, block in zip(reservation.slots, random_blocks(layout, 2), strict=True):
        store.slot_view(slot).copy_(block.reshape(-1))
    store.commit(reservation)
    assert store.reserve(keys).skipped == tuple(keys[:2])
    aborted = store.reserve(keys[2:])
    assert aborted.keys == ()  # keys[2] was reserved by the call above and is still being written
    assert store.lookup(keys).num_blocks == 2


def test_abort_leaves_nothing_readable_and_commit_reads_back_through_slot_view(make_store: StoreFactory,
                                                                               layout: KVLayout) -> None:
    store = make_store(num_slots=4)
    keys = keys_for(store, 3)
    blocks = random_blocks(layout, 3)
    kept = store.reserve(keys[:2])
    dropped = store.reserve(keys[2:])
    for slot, block in zip(kept.slots + dropped.slots, blocks, strict=True):
        store.slot_view(slot).copy_(block.reshape(-1))
    store.commit(kept)
    store.abort(dropped)
    assert store.contains(keys[2]) is None and store.lookup(keys).num_blocks == 2
    lease = store.acquire(keys)
    assert lease.keys == tuple(keys[:2])  # the aborted block is not readable, however complete its bytes
    for slot, block in zip(lease.slots, blocks[:2], strict=True):
        assert torch.equal(store.slot_view(slot).view(layout.block_shape), block)
    store.release(lease)
    out = [torch.empty(layout.block_shape)]
    assert store.get(keys[2:], out).wait().failed == (0,)
    # The aborted slot is free again: a new reservation of the same key gets a slot and writes anew.
    again = store.reserve(keys[2:])
    assert again.keys == tuple(keys[2:]) and len(again.slots) == 1
    store.abort(again)
    assert store.stats().tiers["host"].used_blocks == 2


@pytest.mark.parametrize("bad_call", ["dtype", "shape", "count", "key", "duplicate", "noncontiguous"])
def test_bad_input_is_refused_and_changes_nothing(make_store: StoreFactory, layout: KVLayout,
                                                   bad_call: str) -> None:
    store = make_store()
    keys = keys_for(store, 2)
    blocks = random_blocks(layout, 2)
    if bad_call == "dtype":
        blocks[1] = blocks[1].half()
    elif bad_call == "shape":
        blocks[1] = blocks[1].reshape(-1)[:-1]
    elif bad_call == "count":
        blocks = blocks[:1]
    elif bad_call == "key":
        keys[1] = keys[1][:8]
    elif bad_call == "duplicate":
        keys[1] = keys[0]
    elif bad_call == "noncontiguous":
        blocks[1] = blocks[1].transpose(0, 1)
    with pytest.raises(InvalidInputError):
        store.put(keys, blocks)
    with pytest.raises(InvalidInputError):
        store.get(keys, blocks)
    stats = store.stats()
    assert stats.put_blocks == 0 and stats.tiers["host"].used_blocks == 0


def test_closed_store_refuses_calls(make_store: StoreFactory, layout: KVLayout) -> None:
    store = make_store()
    keys = keys_for(store, 1)
    store.close()
    store.close()
    for call in (lambda: store.lookup(keys), lambda: store.put(keys, random_blocks(layout, 1)),
                 lambda: store.get(keys, random_blocks(layout, 1)), lambda: store.reserve(keys)):
        with pytest.raises(ClosedError):
            call()


def test_config_errors(layout: KVLayout) -> None:
    with pytest.raises(ConfigError):
        Store(layout, StoreConfig(host=HostConfig(capacity_bytes=100)))
    with pytest.raises(ConfigError):
        HostConfig(capacity_bytes=-1)


def test_stats_snapshot_is_immutable(make_store: StoreFactory) -> None:
    stats = make_store().stats()
    with pytest.raises(AttributeError):
        stats.lookups = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.tiers["x"] = stats.tiers["host"]  # type: ignore[index]
    assert stats.to_dict()["tiers"]["host"]["capacity_blocks"] == 8


@pytest.mark.gpu
def test_cuda_blocks_round_trip(make_store: StoreFactory, layout: KVLayout) -> None:
    from kvtier.transfer.cuda import CudaTransferEngine

    config = StoreConfig(host=HostConfig(capacity_bytes=8 * 4096))
    store = Store(layout, config, transfer=CudaTransferEngine(2))
    try:
        keys = keys_for(store, 4)
        blocks = [b.cuda() for b in random_blocks(layout, 4)]
        assert store.put(keys, blocks).wait().ok
        out = [torch.empty_like(b) for b in blocks]
        assert store.get(keys, out).wait().ok
        assert all(torch.equal(o, b) for o, b in zip(out, blocks, strict=True))
    finally:
        store.close()


class _RefusingEngine(CpuTransferEngine):
    """A CPU engine whose ``submit_blocks`` raises while ``refuse`` is set, as a launch that fails on CUDA."""

    refuse = False

    def submit_blocks(self, *args: Any, **kwargs: Any) -> Transfer:
        if self.refuse:
            raise TransferError("the copy kernel did not launch")
        return super().submit_blocks(*args, **kwargs)


def test_a_copy_that_cannot_be_queued_fails_its_blocks_and_holds_no_slot(layout: KVLayout) -> None:
    engine = _RefusingEngine(2)
    config = StoreConfig(host=HostConfig(capacity_bytes=8 * 4096, policy="lru"), transfer=TransferConfig(backend="cpu"))
    with Store(layout, config, transfer=engine) as store:
        keys, blocks = keys_for(store, 3), random_blocks(layout, 3)
        assert store.put(keys[:2], blocks[:2]).wait(10).ok
        engine.refuse = True
        assert store.put(keys[2:], blocks[2:]).wait(10).failed == (0,)  # its reservation aborted, not held
        out = [torch.empty(layout.block_shape) for _ in keys[:2]]
        assert store.get(keys[:2], out).wait(10).failed == (0, 1)  # its pins released
        assert store.stats().put_failed_blocks == 1 and store.stats().get_failed_blocks == 2
        engine.refuse = False
        assert store.put(keys[2:], blocks[2:]).wait(10).ok  # stored now, not taken for a duplicate
        assert store.get(keys, [*out, torch.empty(layout.block_shape)]).wait(10).ok
        assert all(torch.equal(got, block) for got, block in zip(out, blocks, strict=False))
        assert store.host.stats().pinned_blocks == 0


def test_a_reservation_that_ended_cannot_commit_or_abort_the_keys_reserved_again(make_store: StoreFactory,
                                                                                   layout: KVLayout) -> None:
    """A caller's second commit or abort of a reservation whose key was reserved again since (by another writer,
    a promotion) would make that writer's block readable while its bytes are still arriving, or free its slot
    under it: refused, and the new reservation is untouched."""
    store = make_store(num_slots=4)
    key = keys_for(store, 1)
    old = store.reserve(key)
    store.abort(old)
    blocker = store.reserve(keys_for(store, 2)[1:])  # the old slot goes to another key first
    new = store.reserve(key)
    assert new.slots != old.slots
    for stale in (store.commit, store.abort):
        with pytest.raises(InvalidInputError, match="ended"):
            stale(old)
    assert store.lookup(key).num_blocks == 0  # still being written
    block = random_blocks(layout, 1)[0]
    store.slot_view(new.slots[0]).copy_(block.reshape(-1))
    store.commit(new)
    store.abort(blocker)
    out = [torch.empty(layout.block_shape)]
    assert store.get(key, out).wait().ok and torch.equal(out[0], block)
    with pytest.raises(InvalidInputError, match="not reserved"):
        store.commit(new)  # committed already
