"""Numbered scenarios for every policy, and the atomic eviction contract."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CapacityError, ConfigError
from kvtier.policies import POLICIES, ARCPolicy, EvictionPolicy, LRUPolicy, S3FIFOPolicy, make_policy

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
