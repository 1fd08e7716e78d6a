from __future__ import annotations

import pytest
import torch

from kvtier import CapacityError, InvalidInputError
from kvtier.arena import HostArena
from kvtier.host import HostTier, SlotState
from kvtier.policies import LRUPolicy


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def tier() -> HostTier:
    evicted.clear()
    return HostTier(HostArena(3, 4096), LRUPolicy(3), 100, on_evict=lambda k, p: evicted.append((k, int(p[0]))))


evicted: list[tuple[bytes, int]] = []


def put(tier: HostTier, *ids: int) -> None:
    slots = tier.reserve([key(i) for i in ids])
    for i, slot in zip(ids, slots, strict=True):
        tier.payload(slot).fill_(i)
    tier.commit([key(i) for i in ids])


def test_reserve_commit_acquire_release(tier: HostTier) -> None:
    slots = tier.reserve([key(1)])
    assert tier.state(key(1)) is SlotState.WRITING
    assert tier.acquire([key(1)]) == [None]  # a block being written is not readable
    tier.commit([key(1)])
    assert tier.acquire([key(1)]) == slots
    assert tier.stats().pinned_blocks == 1
    tier.release([key(1)])
    assert tier.stats().pinned_blocks == 0
    assert tier.payload(slots[0]).numel() == 100


def test_acquire_run_pins_the_leading_ready_run_and_leaves_the_keys_after_it(tier: HostTier) -> None:
    put(tier, 1, 2)
    tier.reserve([key(5)])  # being written: not readable
    assert tier.acquire_run([key(1), key(3), key(2)]) == tier.acquire([key(1)])
    assert tier.stats().pinned_blocks == 1 and tier.acquire_run([key(5), key(2)]) == []
    tier.release([key(1)])
    tier.release([key(1)])
    assert tier.stats().pinned_blocks == 0
    with pytest.raises(InvalidInputError):
        tier.release([key(2)])  # never pinned: the run stopped at key 3


def test_eviction_demotes_with_bytes_in_place(tier: HostTier) -> None:
    put(tier, 1, 2, 3)
    put(tier, 4)  # store [1, 2, 3] then 4 -> evicts [1]
    assert evicted == [(key(1), 1)]
    assert tier.stats().evictions == 1


def test_pinned_and_writing_slots_are_never_evicted(tier: HostTier) -> None:
    put(tier, 1, 2)
    tier.reserve([key(3)])  # writing
    tier.acquire([key(1)])
    put(tier, 4)  # only 2 is evictable -> evicts [2]
    assert evicted == [(key(2), 2)]
    tier.acquire([key(4)])
    with pytest.raises(CapacityError):
        tier.reserve([key(5)])
    assert tier.stats().used_blocks == 3  # nothing changed


def test_reserve_is_all_or_nothing(tier: HostTier) -> None:
    put(tier, 1)
    tier.acquire([key(1)])
    with pytest.raises(CapacityError):
        tier.reserve([key(2), key(3), key(4)])
    assert tier.stats().used_blocks == 1 and evicted == []
    assert tier.reserve_upto([key(2), key(3), key(4)]) and tier.state(key(4)) is None


def test_abort_frees_and_never_exposes(tier: HostTier) -> None:
    tier.reserve([key(1)])
    tier.abort([key(1)])
    assert tier.state(key(1)) is None and tier.room() == 3


def test_misuse_is_refused(tier: HostTier) -> None:
    put(tier, 1)
    with pytest.raises(InvalidInputError):
        tier.reserve([key(1)])
    with pytest.raises(InvalidInputError):
        tier.commit([key(1)])
    with pytest.raises(InvalidInputError):
        tier.release([key(1)])
    with pytest.raises(InvalidInputError):
        tier.abort([key(9)])


def test_drop(tier: HostTier) -> None:
    put(tier, 1, 2)
    pinned_slot = tier.acquire([key(2)])[0]
    assert pinned_slot is not None
    used = tier.stats().used_blocks
    assert tier.drop(key(1)) and not tier.drop(key(2)) and not tier.drop(key(7))
    assert evicted == []  # dropped, never handed to on_evict (demotion)
    assert tier.state(key(1)) is None and tier.acquire([key(1)]) == [None]
    assert tier.stats().used_blocks == used - 1
    # The pinned block is untouched: still readable, its bytes still its own.
    assert tier.is_ready(key(2)) and bool(torch.all(tier.payload(pinned_slot) == 2))


def test_a_commit_with_slots_checks_every_key_before_changing_any(tier: HostTier) -> None:
    slots = tier.reserve([key(1), key(2)])
    with pytest.raises(InvalidInputError, match="slots for"):
        tier.commit([key(1), key(2)], slots[:1])
    with pytest.raises(InvalidInputError, match="another slot"):
        tier.commit([key(1), key(2)], [slots[0], slots[0]])
    assert tier.state(key(1)) is tier.state(key(2)) is SlotState.WRITING
    tier.commit([key(1), key(2)], slots)
    assert tier.state(key(1)) is tier.state(key(2)) is SlotState.READY
