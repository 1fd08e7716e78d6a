"""Numbered scenarios for every policy, and the atomic eviction contract."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CapacityError, ConfigError
from kvtier.config import HostConfig
from kvtier.policies import (
    POLICIES,
    AdaptiveS3FIFOPolicy,
    ARCPolicy,
    EvictionPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_policy,
)

ALL = sorted(POLICIES)


def filled(name: str, keys: list[int], capacity: int = 4) -> EvictionPolicy[int]:
    policy: EvictionPolicy[int] = make_policy(name, capacity)
    for key in keys:
        policy.insert(key)
    return policy


def test_lru_scenarios() -> None:
    policy = filled("lru", [1, 2, 3])
    policy.touch(1)
    assert policy.evict(1) == [2]  # store [1, 2, 3], read 1 -> evicts [2]
    assert policy.evict(1, protected=frozenset({3})) == [1]  # 3 pinned -> evicts [1]
    assert len(policy) == 1 and 3 in policy


def test_s3fifo_scenarios() -> None:
    policy = filled("s3fifo", [1, 2, 3], capacity=10)
    policy.touch(2)
    # store [1, 2, 3], read 2 -> evicts [1, 3]: unread keys leave the small queue, 2 moves to main.
    assert policy.evict(2) == [1, 3]
    assert 2 in policy
    policy.insert(1)  # 1 is a ghost: it returns straight into the main queue, behind 2
    assert policy.evict(1) == [2]
    assert 1 in policy


def test_s3fifo_gives_read_keys_in_main_another_round() -> None:
    policy: S3FIFOPolicy[int] = S3FIFOPolicy(capacity=10)
    for key in (1, 2):
        policy.insert(key)
        policy.touch(key)
    assert policy.evict(1) == [1]  # both promoted to main with their count reset, then 1 is the oldest
    policy.touch(2)
    policy.insert(4)
    policy.insert(5)
    policy.touch(5)
    # small [4, 5(read)] -> 4 evicted from small; then 5 promoted; main [2(read), 5]: 2 gets another round.
    assert policy.evict(2) == [4, 5]
    assert 2 in policy


def test_arc_scenarios() -> None:
    policy = filled("arc", [1, 2, 3])
    policy.touch(1)  # 1 moves to the frequent list
    assert policy.evict(1) == [2]  # the recent list's oldest goes first
    policy.insert(2)  # a ghost hit in B1 grows the recent list's target
    assert isinstance(policy, ARCPolicy) and policy._target_t1 >= 1
    assert 2 in policy


def access(policy: EvictionPolicy[int], key: int) -> None:
    """One lookup as the host tier sees it: a hit is a touch, a miss evicts one key if full and inserts."""
    if key in policy:
        policy.touch(key)
        return
    if len(policy) >= policy.capacity:
        policy.evict(1)
    policy.insert(key)


def recency_heavy(policy: EvictionPolicy[int], keys: int = 400) -> None:
    """Every key comes back once, 8 lookups later (a conversation's next turn), then never again."""
    for number in range(keys):
        access(policy, 10_000 + number)
        if number >= 8:
            access(policy, 10_000 + number - 8)


def frequency_and_scans(policy: EvictionPolicy[int], rounds: int = 60) -> None:
    """A hot set of 12 keys read every round, with a scan of 6 keys never seen again between rounds."""
    scanned = 100_000
    for _ in range(rounds):
        for key in range(12):
            access(policy, key)
        for key in range(scanned, scanned + 6):
            access(policy, key)
        scanned += 6


def test_adaptive_s3fifo_starts_as_s3fifo_and_grows_probation_on_a_recency_heavy_sequence() -> None:
    policy: AdaptiveS3FIFOPolicy[int] = AdaptiveS3FIFOPolicy(capacity=20)
    assert policy.small_target == 2  # S3-FIFO's 10%
    recency_heavy(policy)
    # Each key left the small queue unread before its second lookup: ghost hits of the small queue.
    assert policy.small_target == 19


def test_adaptive_s3fifo_shrinks_probation_back_on_a_hot_set_with_scans() -> None:
    policy: AdaptiveS3FIFOPolicy[int] = AdaptiveS3FIFOPolicy(capacity=20)
    recency_heavy(policy)
    frequency_and_scans(policy)
    # With a 19-block probation the hot keys fell out of a 1-block main queue and came back from its ghost.
    assert policy.small_target <= 3
    fresh: AdaptiveS3FIFOPolicy[int] = AdaptiveS3FIFOPolicy(capacity=20)
    frequency_and_scans(fresh)
    assert fresh.small_target == 2  # scanned keys never come back: no ghost hit argues for more probation


def test_adaptive_s3fifo_ghosts_are_bounded_by_capacity_and_never_resident() -> None:
    policy: AdaptiveS3FIFOPolicy[int] = AdaptiveS3FIFOPolicy(capacity=20)
    for _ in range(3):
        recency_heavy(policy)
        frequency_and_scans(policy)
        for key in range(200, 260):  # a loop longer than the cache feeds the main queue's ghost
            access(policy, key)
    assert len(policy) == 20
    assert 0 < len(policy._ghost) <= 20 and 0 < len(policy._main_ghost) <= 20
    assert not any(key in policy for key in [*policy._ghost, *policy._main_ghost])
    assert not set(policy._ghost) & set(policy._main_ghost)


def test_adaptive_s3fifo_is_a_host_policy_and_needs_a_capacity() -> None:
    assert HostConfig(policy="s3fifo_adaptive").policy == "s3fifo_adaptive"
    assert isinstance(make_policy("s3fifo_adaptive", 1), AdaptiveS3FIFOPolicy)
    for capacity in (0, -3):
        with pytest.raises(ConfigError):
            AdaptiveS3FIFOPolicy(capacity)
        with pytest.raises(ConfigError):
            make_policy("s3fifo_adaptive", capacity)


@pytest.mark.parametrize("name", ALL)
def test_evict_is_atomic(name: str) -> None:
    policy = filled(name, [1, 2, 3])
    with pytest.raises(CapacityError):
        policy.evict(2, protected=frozenset({1, 2}))
    assert sorted(k for k in (1, 2, 3) if k in policy) == [1, 2, 3]
    assert policy.evict(1, protected=frozenset({1, 2})) == [3]


@pytest.mark.parametrize("name", ALL)
def test_evict_zero_and_negative(name: str) -> None:
    policy = filled(name, [1])
    assert policy.evict(0) == []
    with pytest.raises(ValueError):
        policy.evict(-1)


@pytest.mark.parametrize("name", ALL)
def test_remove_is_not_an_eviction(name: str) -> None:
    policy = filled(name, [1, 2])
    policy.remove(1)
    policy.remove(99)
    assert 1 not in policy and len(policy) == 1


def test_unknown_policy_and_bad_capacity() -> None:
    with pytest.raises(ConfigError):
        make_policy("fifo", 4)
    with pytest.raises(ConfigError):
        LRUPolicy(0)


operations = st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove", "evict"]), st.integers(0, 12),
                                st.frozensets(st.integers(0, 12), max_size=4)), max_size=80)


@pytest.mark.parametrize("name", ALL)
@settings(deadline=None)  # a loaded 2-core machine can take more than Hypothesis's default 200 ms per example
@given(ops=operations)
def test_policy_tracks_exactly_the_resident_keys(name: str, ops: list[tuple[str, int, frozenset[int]]]) -> None:
    policy: EvictionPolicy[int] = make_policy(name, 6)
    resident: set[int] = set()
    for op, key, protected in ops:
        if op == "insert" and key not in resident:
            policy.insert(key)
            resident.add(key)
        elif op == "touch":
            policy.touch(key)
        elif op == "remove":
            policy.remove(key)
            resident.discard(key)
        elif op == "evict":
            count = key % 3
            try:
                victims = policy.evict(count, protected)
            except CapacityError:
                assert len(resident - protected) < count
                continue
            assert len(victims) == count and not set(victims) & protected and set(victims) <= resident
            resident -= set(victims)
        assert len(policy) == len(resident)
        assert all(k in policy for k in resident)
