"""Disk admission policies: the named choices, reject-first's ghost list, and what adaptive learns."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest

from kvtier.disk.admission import (
    MAX_TRACKED_KEYS,
    SHADOW_BLOCKS,
    AdaptiveAdmission,
    AdmitAll,
    RejectFirst,
    make_admission,
)
from kvtier.errors import ConfigError
from kvtier.replay import Trace, replay_tiered


def test_make_admission_builds_each_named_policy() -> None:
    for name, kind in (("admit_all", AdmitAll), ("reject_first", RejectFirst), ("adaptive", AdaptiveAdmission)):
        policy = make_admission(name, 100)
        assert isinstance(policy, kind)
        assert policy.name == name


@pytest.mark.parametrize(("name", "capacity"), [("lru", 10), ("adaptive", 0), ("admit_all", 0),
                                                ("reject_first", -1), ("adaptive", True)])
def test_make_admission_refuses_unknown_names_and_bad_capacities(name: str, capacity: int) -> None:
    with pytest.raises(ConfigError):
        make_admission(name, capacity)


def test_only_adaptive_ever_runs_the_disk_exclusive() -> None:
    assert not any(make_admission(name, 10).exclusive for name in ("admit_all", "reject_first", "adaptive"))


def test_admit_all_admits_unseen_keys() -> None:
    policy = AdmitAll()
    assert policy.admit(b"\x01" * 16)
    assert policy.admit(7)


def test_reject_first_admits_on_the_second_sighting() -> None:
    policy = RejectFirst(10)
    policy.on_access(1, False)
    assert not policy.admit(1)
    policy.on_access(1, False)
    assert policy.admit(1)
    assert not policy.admit(2)  # offered without a lookup: never sighted


def test_reject_first_forgets_keys_that_leave_the_ghost_list() -> None:
    policy = RejectFirst(2, ghost_factor=2)
    policy.on_access(b"a", False)
    for other in range(4):
        policy.on_access(other, False)
    policy.on_access(b"a", False)
    assert not policy.admit(b"a")
    assert policy.ghost_capacity == 4


def test_ghost_lists_are_capped() -> None:
    assert RejectFirst(10**9).ghost_capacity == MAX_TRACKED_KEYS
    assert AdaptiveAdmission(10**9).ghost_capacity == MAX_TRACKED_KEYS


def test_adaptive_memory_stays_bounded() -> None:
    policy = AdaptiveAdmission(8000)  # a ghost of 32,000 keys, shadows of 4096 on a half sample
    for key in range(60_000):
        policy.on_access(key, False)
        policy.on_access(key, True)
        policy.admit(key)
    assert policy.tracked_keys <= policy.ghost_capacity + 4 * SHADOW_BLOCKS  # four shadows


def test_adaptive_fills_an_empty_disk_then_starts_as_reject_first() -> None:
    policy = AdaptiveAdmission(2)
    assert policy.mode == "reject_first"
    assert policy.admit(b"a" * 16) and policy.admit(b"b" * 16)  # free space: no sighting needed
    policy.on_access(b"k" * 16, False)
    assert not policy.admit(b"k" * 16)
    policy.on_access(b"k" * 16, True)
    assert policy.admit(b"k" * 16)
    assert (policy.offers, policy.admitted) == (4, 3)


def _documents(first: int, count: int, length: int = 4) -> list[list[int]]:
    return [[(first + doc) * length + block for block in range(length)] for doc in range(count)]


def _used_twice(count: int, gap: int = 20, first: int = 0) -> list[list[int]]:
    """Each document read twice, ``gap`` documents apart: only admit-all ever turns the reuse into a hit."""
    docs = _documents(first, count)
    requests: list[list[int]] = []
    for step in range(count + gap):
        if step < count:
            requests.append(docs[step])
        if step >= gap:
            requests.append(docs[step - gap])
    return requests


def _hot_set_and_one_offs(count: int, seed: int = 1) -> list[list[int]]:
    """Half the requests read one of 40 hot documents, half a document never seen again."""
    rng = random.Random(seed)
    hot = _documents(10**6, 40)
    cold = iter(_documents(2 * 10**6, count))
    return [hot[rng.randrange(40)] if rng.random() < 0.5 else next(cold) for _ in range(count)]


def test_adaptive_follows_admit_all_where_reuse_comes_only_once() -> None:
    trace = Trace(_used_twice(3000))
    policy = AdaptiveAdmission(200)
    adaptive = replay_tiered(trace, 8, 200, admission=policy)
    admit_all = replay_tiered(trace, 8, 200, admission="admit_all")
    assert replay_tiered(trace, 8, 200, admission="reject_first").disk_hits == 0
    assert policy.mode == "admit_all"
    assert adaptive.block_hit_ratio >= 0.97 * admit_all.block_hit_ratio


def test_adaptive_decides_on_the_hits_that_differ_not_on_shared_prefix_hits() -> None:
    # Every request starts with the same 30-block prompt, which both choices hit: most hits are those. The
    # documents behind it are read twice, and only admit-all turns that reuse into hits: a rule on all hits
    # (admit-all ahead by a share of them) never switches, a test on the hits that differ does.
    prompt = list(range(10**7, 10**7 + 30))
    trace = Trace([prompt + doc for doc in _used_twice(3000)])
    policy = AdaptiveAdmission(300)
    adaptive = replay_tiered(trace, 8, 300, admission=policy)
    reject_first = replay_tiered(trace, 8, 300, admission="reject_first")
    assert policy.mode == "admit_all"
    assert adaptive.block_hit_ratio > reject_first.block_hit_ratio + 0.02


def test_adaptive_stays_reject_first_when_one_off_blocks_would_flood_the_disk() -> None:
    trace = Trace(_hot_set_and_one_offs(6000))
    policy = AdaptiveAdmission(200)
    adaptive = replay_tiered(trace, 8, 200, admission=policy)
    reject_first = replay_tiered(trace, 8, 200, admission="reject_first")
    admit_all = replay_tiered(trace, 8, 200, admission="admit_all")
    assert policy.mode == "reject_first"
    assert adaptive.block_hit_ratio >= reject_first.block_hit_ratio - 0.01
    assert adaptive.block_hit_ratio > admit_all.block_hit_ratio
    assert adaptive.disk_blocks_written < admit_all.disk_blocks_written / 3


def _uniform(docs: int, count: int, seed: int = 1) -> list[list[int]]:
    """``count`` requests, each for one of ``docs`` documents picked uniformly."""
    rng = random.Random(seed)
    pool = _documents(0, docs)
    return [pool[rng.randrange(docs)] for _ in range(count)]


def test_adaptive_runs_the_disk_exclusive_where_host_ram_is_a_good_share_of_both() -> None:
    # 100 blocks read uniformly over host RAM of 40 and a disk of 60: only a disk holding other blocks than
    # host RAM's holds them all. Inclusive, the copies of host RAM's blocks waste the disk.
    trace = Trace(_uniform(25, 4000))
    policy = AdaptiveAdmission(60)
    assert not policy.exclusive  # a disk starts inclusive of host RAM
    exclusive = replay_tiered(trace, 40, 60, admission=policy)
    inclusive = replay_tiered(trace, 40, 60, admission=AdaptiveAdmission(60, exclusive_gain_per_write=math.inf))
    assert policy.exclusive and policy.exclusive_switches >= 1
    assert exclusive.disk_moved_to_host > 0 and inclusive.disk_moved_to_host == 0
    assert exclusive.block_hit_ratio > 0.97 and exclusive.block_hit_ratio > inclusive.block_hit_ratio + 0.1


def test_adaptive_keeps_the_disk_inclusive_when_it_is_many_times_host_ram() -> None:
    # The same blocks over host RAM of 8 and a disk of 200: the disk holds them all either way, so dropping a
    # copy read would only rewrite it when host RAM evicts it.
    policy = AdaptiveAdmission(200)
    result = replay_tiered(Trace(_uniform(25, 4000)), 8, 200, admission=policy)
    assert (policy.exclusive, policy.exclusive_switches, result.disk_moved_to_host) == (False, 0, 0)
    assert result.disk_blocks_written == 100


def test_adaptive_beats_both_fixed_choices_when_the_workload_changes() -> None:
    trace = Trace(_used_twice(1500) + _hot_set_and_one_offs(6000))
    ratios = {name: replay_tiered(trace, 8, 200, admission=name).block_hit_ratio
              for name in ("adaptive", "admit_all", "reject_first")}
    assert ratios["adaptive"] > max(ratios["admit_all"], ratios["reject_first"]) + 0.05


# A mixed trace through an adaptive policy with a simulated FIFO disk of its admitted keys: keys used twice
# a while apart (admitting first sightings pays: the policy switches from reject_first to admit_all at a
# point its sampled shadows decide), then a hot set among one-offs. Prints a digest of every answer and
# mode, and how many offers were admitted and refused.
_ADAPTIVE_RUN = """
import collections, hashlib, random
from kvtier.disk.admission import SHADOW_BLOCKS, make_admission
rng = random.Random(5)
capacity = 2 * SHADOW_BLOCKS  # the shadows sample one key in two
policy = make_admission("adaptive", capacity)
disk, answers, pending = collections.OrderedDict(), [], collections.deque()
hot = [rng.randbytes(16) for _ in range(capacity // 2)]
for step in range(40_000):
    if step < 25_000:
        if pending and (rng.random() < 0.5 or len(pending) > 2000):
            key = pending.popleft()
        else:
            key = rng.randbytes(16)
            pending.append(key)
    elif rng.random() < 0.5:
        key = rng.choice(hot)
    else:
        key = rng.randbytes(16)
    hit = key in disk
    policy.on_access(key, hit)
    if not hit:
        admitted = policy.admit(key)
        answers.append(admitted)
        if admitted:
            disk[key] = None
            if len(disk) > capacity:
                disk.popitem(last=False)
    answers.append(getattr(policy, "mode", ""))
digest = hashlib.sha256(repr(answers).encode()).hexdigest()
print(digest, sum(a is True for a in answers), sum(a is False for a in answers))
"""


def _adaptive_run(hash_seed: str) -> tuple[str, int, int]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", _ADAPTIVE_RUN], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    digest, admitted, refused = done.stdout.split()
    return digest, int(admitted), int(refused)


def test_adaptive_decides_the_same_in_every_process() -> None:
    # Sampling and scoring must not depend on the interpreter's string/bytes hash seed or on a random
    # source: two daemons (or a restart) given the same trace decide the same.
    first, second = _adaptive_run("1"), _adaptive_run("2")
    assert first == second
    _, admitted, refused = first
    assert admitted > 100 and refused > 100  # both answers occur, so a coin flip could not match
