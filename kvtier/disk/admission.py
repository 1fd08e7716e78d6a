"""Disk admission: which blocks evicted from the host tier are worth a flash write.

The disk tier calls ``on_access(key, hit)`` for every block a lookup references, in lookup order (``hit``:
the block is inside the lookup's leading run of present blocks), and ``admit(key)`` when the host tier
evicts a block the disk does not hold. Policies, by name (``make_admission``):

- ``admit_all``: writes every offered block.
- ``reject_first``: writes a block on its second sighting. Sightings are lookups (``on_access`` calls),
  remembered in a ghost list of ``4 x`` the disk's capacity in keys: a first sighting costs one recompute,
  and blocks seen only once (most of a trace's blocks) never reach flash.
- ``adaptive`` (the default): fills an empty disk, then runs ``reject_first`` or ``admit_all``, whichever
  a shadow simulation of both on a sample of the keys says gives more hits, each on a disk inclusive or
  exclusive of host RAM (``exclusive``), as its own shadows of both say. See ``AdaptiveAdmission``.

``exclusive`` (``False`` but for ``adaptive``) tells the disk tier whether a block read into host RAM should
leave the disk now: host and disk then hold different blocks, and host RAM's eviction offers the block again.

``hit`` is in the contract for policies that learn from hits; these learn from sightings and from the order
of lookups, which the shadow simulation replays itself.

Promises:
- Both calls are O(1) amortised and never raise; memory is bounded by a multiple of the disk's capacity in
  blocks and never exceeds ``MAX_TRACKED_KEYS`` ghost entries plus ``SHADOW_BLOCKS`` keys per shadow (an
  exclusive shadow also remembers the slots of its dropped keys until their region goes: at most its
  capacity plus the late offers in its regions).
- Answers depend only on the calls made so far (no clock, no randomness, no knowledge of the future). Key
  sampling hashes bytes keys by their leading bytes and other keys by ``hash()``, so int ids and
  content-addressed (bytes) keys get the same answers in every process.
- ``make_admission`` raises ``ConfigError`` on an unknown name or a capacity below one block.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

from kvtier.config import DiskConfig
from kvtier.errors import ConfigError

ADMISSIONS: Final = ("adaptive", "admit_all", "reject_first")
# Caps the ghost list of a huge disk at about 200 MB of Python objects. Past 256 Ki blocks of disk the ghost
# remembers less than 4x the capacity, which only makes reject-first stricter (fewer writes), never looser.
MAX_TRACKED_KEYS: Final = 1 << 20
# Shadow caches simulate at most this many blocks each; bigger disks are simulated on a key sample.
SHADOW_BLOCKS: Final = 4096
GHOST_FACTOR: Final = 4
# The disk tier's default; the shadows only need to be close to the configured value.
REINSERT_HITS: Final = DiskConfig.reinsert_hits

_MASK64 = (1 << 64) - 1


def _key_hash(key: Hashable) -> int:
    """A well-mixed 64-bit hash of ``key``, the same in every process for ints and bytes."""
    x = int.from_bytes(key[:8], "little") if isinstance(key, bytes | bytearray) else hash(key) & _MASK64
    # splitmix64's finaliser: sequential trace ids must not be sampled in stripes.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _check_capacity(disk_capacity_blocks: int) -> None:
    if isinstance(disk_capacity_blocks, bool) or not isinstance(disk_capacity_blocks, int) or disk_capacity_blocks < 1:
        raise ConfigError(f"an admission policy needs a disk of at least 1 block, got {disk_capacity_blocks!r}")


class AdmissionPolicy(ABC):
    """Decides which host evictions the disk tier writes; see the module docstring for the contract."""

    name: str = ""

    @abstractmethod
    def on_access(self, key: Hashable, hit: bool) -> None:
        """A lookup referenced ``key``; ``hit``: it was inside the lookup's leading run of present blocks."""

    @abstractmethod
    def admit(self, key: Hashable) -> bool:
        """The host tier evicted ``key`` and the disk does not hold it: should the disk write it?"""

    @property
    def exclusive(self) -> bool:
        """Whether the disk should now drop its copy of a block read into host RAM (see the module docstring)."""
        return False


class AdmitAll(AdmissionPolicy):
    name = "admit_all"

    def on_access(self, key: Hashable, hit: bool) -> None:
        pass

    def admit(self, key: Hashable) -> bool:
        return True


class RejectFirst(AdmissionPolicy):
    """Admits a block seen by at least two lookups while it stayed in the ghost list (LRU, bounded)."""

    name = "reject_first"

    def __init__(self, disk_capacity_blocks: int, ghost_factor: int = GHOST_FACTOR) -> None:
        _check_capacity(disk_capacity_blocks)
        self.ghost_capacity = min(ghost_factor * disk_capacity_blocks, MAX_TRACKED_KEYS)
        self._sightings: OrderedDict[Hashable, int] = OrderedDict()

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._sightings[key] = self._sightings.pop(key, 0) + 1
        if len(self._sightings) > self.ghost_capacity:
            self._sightings.popitem(last=False)

    def admit(self, key: Hashable) -> bool:
        return self._sightings.get(key, 0) >= 2


class _Sighting:
    """What the adaptive policy remembers of a key: sightings, the key looked up just before it, times."""

    __slots__ = ("count", "last_access", "last_offer", "pred")

    def __init__(self, pred: Hashable, now: int) -> None:
        self.count = 1
        self.pred = pred
        self.last_access = now
        self.last_offer = -1


class _Shadow(ABC):
    """A stand-in for the disk under one admission choice, on sampled keys, with its score: ``keys`` maps each
    key it holds to ``[reads since written, when written or where]``."""

    def __init__(self, admit_all: bool) -> None:
        self.admit_all = admit_all
        self.keys: OrderedDict[Hashable, list[int]] = OrderedDict()
        self.hits = 0.0
        self.writes = 0.0
        self.alive = False

    def writes_offer(self, seen_twice: bool) -> bool:
        """Whether this shadow's admission choice writes an offered block."""
        return self.admit_all or seen_twice or not self.full

    @property
    @abstractmethod
    def full(self) -> bool:
        """Whether every slot is used (reject-first admits only blocks seen twice then)."""

    @abstractmethod
    def would_hold(self, written_at: int) -> bool:
        """Whether a block written at ``written_at`` would not have been evicted yet."""

    @abstractmethod
    def write(self, key: Hashable, now: int) -> None:
        """Store ``key`` as written at ``now`` (in the past for a late offer), evicting as the disk would."""

    @abstractmethod
    def read(self, key: Hashable) -> None:
        """A lookup read the stored ``key`` (a hit)."""

    def halve(self) -> None:
        self.hits /= 2
        self.writes /= 2


class _InclusiveShadow(_Shadow):
    """The disk keeping its copy of a block read into host RAM: a FIFO of keys whose blocks read
    ``REINSERT_HITS`` times go round again, as the disk tier reinserts them."""

    def __init__(self, capacity: int, admit_all: bool) -> None:
        super().__init__(admit_all)
        self.capacity = capacity

    def write(self, key: Hashable, now: int) -> None:
        if key in self.keys:
            return
        self.keys[key] = [0, now]
        self.writes += 1
        while len(self.keys) > self.capacity:
            oldest, (reads, _) = self.keys.popitem(last=False)
            if reads >= REINSERT_HITS:
                self.keys[oldest] = [0, now]
                self.writes += 1

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.capacity

    def would_hold(self, written_at: int) -> bool:
        return not self.full or written_at >= next(iter(self.keys.values()))[1]

    def read(self, key: Hashable) -> None:
        self.keys[key][0] += 1


class _ShadowRegion:
    """A region of an exclusive shadow: its blocks still there, when it was opened, every key written to it."""

    __slots__ = ("keys", "live", "opened_at")

    def __init__(self, opened_at: int) -> None:
        self.live = 0
        self.opened_at = opened_at
        self.keys: list[Hashable] = []


class _ExclusiveShadow(_Shadow):
    """The disk dropping its copy of a block read into host RAM (host RAM's eviction offers it again): a log
    of regions of ``region_blocks`` slots, the disk's. A dropped block's slot stays used until its region is
    evicted (oldest first, when a write needs room), unless the region is left without a live block: then it
    is free at once, as in the disk tier. A block offered late (``write`` with a past time: it left host RAM
    then, unoffered) goes into the region that was open then and takes its room from the oldest region now;
    appended at the head instead, it would outlive its lap, and the policy would favour exclusivity only
    because the running inclusive disk held such blocks when host RAM dropped them."""

    def __init__(self, capacity: int, admit_all: bool, region_blocks: int) -> None:
        super().__init__(admit_all)
        self.region_blocks = max(1, min(region_blocks, capacity))
        self.capacity = max(1, capacity // self.region_blocks) * self.region_blocks
        # Regions, oldest first, the open one last, by id.
        self._regions: OrderedDict[int, _ShadowRegion] = OrderedDict({0: _ShadowRegion(0)})
        self._open_id = 0
        self._sealed_slots = 0
        # When each region from _first_id on was opened (ascending): where a late write goes.
        self._starts: list[int] = [0]
        self._first_id = 0
        # Blocks written before this time were in regions evicted since.
        self._horizon = 0

    @property
    def full(self) -> bool:
        return self._sealed_slots + len(self._regions[self._open_id].keys) >= self.capacity

    def would_hold(self, written_at: int) -> bool:
        return written_at >= self._horizon

    def write(self, key: Hashable, now: int) -> None:
        if key in self.keys:
            return
        if now >= self._regions[self._open_id].opened_at:
            self._append(key, now)
        else:
            region_id = self._first_id + max(0, bisect.bisect_right(self._starts, now) - 1)
            while region_id not in self._regions:
                region_id += 1  # that region was freed: the next one still there (the open one at the latest)
            region = self._regions[region_id]
            region.live += 1
            region.keys.append(key)
            self.keys[key] = [0, region_id]
            self.writes += 1
            if region_id != self._open_id:
                self._sealed_slots += 1
        self._make_room()

    def _append(self, key: Hashable, now: int) -> None:
        """Into the open region; a full one is sealed first (freed if every block left it while open)."""
        region = self._regions[self._open_id]
        if len(region.keys) >= self.region_blocks:
            if region.live:
                self._sealed_slots += len(region.keys)
            else:
                del self._regions[self._open_id]
            self._open_id += 1
            region = _ShadowRegion(max(now, region.opened_at))
            self._regions[self._open_id] = region
            self._starts.append(region.opened_at)
        region.live += 1
        region.keys.append(key)
        self.keys[key] = [0, self._open_id]
        self.writes += 1

    def _make_room(self) -> None:
        while self._sealed_slots + self.region_blocks > self.capacity:
            region_id, region = self._regions.popitem(last=False)
            self._sealed_slots -= len(region.keys)
            self._horizon = self._starts[region_id + 1 - self._first_id]
            for key in region.keys:
                entry = self.keys.get(key)
                if entry is not None and entry[1] == region_id:
                    del self.keys[key]  # never read since written: a read dropped it
        oldest = next(iter(self._regions))
        if oldest - self._first_id > len(self._regions):
            del self._starts[:oldest - self._first_id]
            self._first_id = oldest

    def read(self, key: Hashable) -> None:
        """A hit: the block moves to host RAM and leaves this disk."""
        _, region_id = self.keys.pop(key)
        region = self._regions[region_id]
        region.live -= 1
        if not region.live and region_id != self._open_id:
            del self._regions[region_id]
            self._sealed_slots -= len(region.keys)


_REJECT_FIRST, _ADMIT_ALL = 0, 1
# An exclusive shadow's index: its admission choice's plus this.
_EXCLUSIVE = 2
# The pairs of shadows compared: the admission choices (reject-first inclusive against admit-all either
# way), and each choice inclusive against exclusive.
_PAIRS: Final = ((_REJECT_FIRST, _ADMIT_ALL), (_REJECT_FIRST, _ADMIT_ALL + _EXCLUSIVE),
                 (_REJECT_FIRST, _REJECT_FIRST + _EXCLUSIVE), (_ADMIT_ALL, _ADMIT_ALL + _EXCLUSIVE))
_MODE_NAMES: Final = ("reject_first", "admit_all")


class AdaptiveAdmission(AdmissionPolicy):
    """Follows reject-first or admit-all, whichever a shadow simulation of both says hits more, each on a disk
    inclusive or exclusive of host RAM, whichever its own two shadows say.

    Why a shadow and not a split of the real keys (set dueling): KV blocks are prefix chains, and a lookup
    hits only up to its first missing block, so admitting a random part of a chain wastes the writes and
    measures nothing. Each shadow is a region log of the disk's capacity (scaled by the sample rate) fed
    with the sampled host evictions its choice would write. The disk tier offers only blocks it does not
    hold, so a block that left host RAM unoffered (the real disk had it) is offered to the shadows late, at
    its next lookup, as of when it left: otherwise each shadow would be starved of exactly the blocks the
    running choice keeps, and the policy would favour whatever it runs. A sampled lookup scores a hit in a
    shadow when the block is there or still in host RAM (estimated from the typical age at which the host
    evicts) and every sampled block before it in the same chain scored too. A chain starts where a key's
    predecessor in the lookup stream differs from the one it had last time (a block's parent never
    changes; a prefix's first block follows whatever request came before).

    Until it has admitted a disk's worth of blocks, it admits every offer (and so does each shadow until
    it is full): filling free space displaces nothing, so those writes cost no hits. A disk reopened full
    after a restart pays that once, one disk's worth of writes.

    Scores decay by half every ``window_factor`` shadow capacities of sampled lookups. The policy starts
    with reject-first (the cheaper one in writes) and switches to admit-all only when admit-all leads on
    the hits that differ (sampled lookups that hit in one shadow and not the other) by more than ``z``
    standard deviations of a sign test *and* each extra block written buys at least
    ``min_gain_per_write`` hits (flash endurance is the budget being spent); it switches back when
    reject-first leads by that test or the extra writes stop paying half that. Why not a margin on all
    hits: blocks both choices hit (shared prompts) are most hits, and they hide a real difference.

    Exclusivity (``exclusive``): each admission choice also runs on an exclusive shadow, a log of the disk's
    regions (``region_blocks``) that drops a block when a lookup reads it (host RAM holds it then) and frees a
    region left without a live block. Each choice is exclusive while its exclusive shadow leads its inclusive
    one by the same test, with ``exclusive_gain_per_write`` hits for each extra block written (the extra
    writes are rewrites of blocks read, which bring nothing new to the disk), and inclusive again when that
    lead goes or stops paying half. Why: with host RAM a good share of host plus disk, the blocks both hold
    waste the disk (most hits then come back within a lap of host RAM); with a disk many times host RAM,
    keeping the copy is a second chance for a block read, which the log's reinsertion keeps. Admit-all is
    weighed against reject-first as admit-all now runs (inclusive or exclusive), and reject-first as it
    runs inclusive: exclusive, reject-first rewrites every block read (each seen twice), nearly admit-all's
    writes, and compared so the switch to admit-all would wait on half of admit-all.
    """

    name = "adaptive"

    def __init__(self, disk_capacity_blocks: int, *, ghost_factor: int = GHOST_FACTOR,
                 shadow_blocks: int = SHADOW_BLOCKS, z: float = 2.0, min_gain_per_write: float = 0.1,
                 exclusive_gain_per_write: float = 0.2, window_factor: int = 16, region_blocks: int = 1) -> None:
        _check_capacity(disk_capacity_blocks)
        self.ghost_capacity = min(ghost_factor * disk_capacity_blocks, MAX_TRACKED_KEYS)
        self._capacity = disk_capacity_blocks
        rate = min(1.0, shadow_blocks / disk_capacity_blocks)
        self._sample_below = int(rate * (1 << 64))
        self._sample_all = rate >= 1.0
        shadow_capacity = max(1, round(disk_capacity_blocks * rate))
        # Reject-first and admit-all inclusive of host RAM, then each exclusive (indexed by _REJECT_FIRST and
        # _ADMIT_ALL, plus _EXCLUSIVE).
        self._shadows: tuple[_InclusiveShadow | _ExclusiveShadow, ...] = (
            _InclusiveShadow(shadow_capacity, False), _InclusiveShadow(shadow_capacity, True),
            _ExclusiveShadow(shadow_capacity, False, region_blocks),
            _ExclusiveShadow(shadow_capacity, True, region_blocks))
        # For each pair compared, the sampled lookups that hit in one shadow and not the other: [the first's,
        # the second's].
        self._wins = {pair: [0.0, 0.0] for pair in _PAIRS}
        self._window = window_factor * shadow_capacity
        self._z = z
        self._min_gain_per_write = min_gain_per_write
        self._exclusive_gain_per_write = exclusive_gain_per_write
        self._ghost: OrderedDict[Hashable, _Sighting] = OrderedDict()
        self._now = 0
        self._prev: Hashable = None
        self._host_age = 0.0
        self._sampled_since_halving = 0
        self._mode = _REJECT_FIRST
        self._exclusive = [False, False]  # per admission choice
        self.switches = 0
        self.exclusive_switches = 0
        self.offers = 0
        self.admitted = 0

    @property
    def mode(self) -> str:
        """The choice now followed: ``"reject_first"`` or ``"admit_all"``."""
        return _MODE_NAMES[self._mode]

    @property
    def exclusive(self) -> bool:
        return self._exclusive[self._mode]

    @property
    def tracked_keys(self) -> int:
        """Keys held in memory: the ghost list plus the shadows (bounded, see the module docstring)."""
        return len(self._ghost) + sum(len(shadow.keys) for shadow in self._shadows)

    def _sampled(self, key: Hashable) -> bool:
        return self._sample_all or _key_hash(key) < self._sample_below

    def on_access(self, key: Hashable, hit: bool) -> None:
        self._now += 1
        sighting = self._ghost.pop(key, None)
        evicted_at = None
        if sighting is None:
            # A first sighting is in no shadow and not in host RAM: it scores nothing wherever it sits.
            chain_start = in_host = seen_twice = False
            sighting = _Sighting(self._prev, self._now)
        else:
            chain_start = sighting.pred != self._prev
            in_host = sighting.last_access > sighting.last_offer and self._now - sighting.last_access < self._host_age
            if sighting.last_access > sighting.last_offer and not in_host:
                # Host RAM dropped it without an offer, so the disk holds it; under another choice it would
                # have been offered (and maybe written) then.
                evicted_at = sighting.last_access + int(self._host_age)
            seen_twice = sighting.count >= 2
            sighting.count += 1
            sighting.pred = self._prev
            sighting.last_access = self._now
        self._ghost[key] = sighting
        if len(self._ghost) > self.ghost_capacity:
            self._ghost.popitem(last=False)
        self._prev = key
        if chain_start:
            for shadow in self._shadows:
                shadow.alive = True
        if self._sampled(key):
            if evicted_at is not None:
                self._offer_to_shadows(key, seen_twice, evicted_at)
            self._score(key, in_host)

    def _offer_to_shadows(self, key: Hashable, seen_twice: bool, written_at: int) -> None:
        for shadow in self._shadows:
            if shadow.writes_offer(seen_twice) and key not in shadow.keys and shadow.would_hold(written_at):
                shadow.write(key, written_at)

    def _score(self, key: Hashable, in_host: bool) -> None:
        for shadow in self._shadows:
            on_disk = not in_host and key in shadow.keys
            shadow.alive = shadow.alive and (in_host or on_disk)
            if shadow.alive:
                shadow.hits += 1
                if on_disk:
                    shadow.read(key)
        shadows = self._shadows
        for (first, second), wins in self._wins.items():
            if shadows[first].alive != shadows[second].alive:
                wins[shadows[second].alive] += 1
        self._sampled_since_halving += 1
        if self._sampled_since_halving >= self._window:
            self._sampled_since_halving = 0
            for shadow in shadows:
                shadow.halve()
            for wins in self._wins.values():
                wins[0] /= 2
                wins[1] /= 2
        self._decide()

    def _decide(self) -> None:
        admit_all = _ADMIT_ALL + _EXCLUSIVE * self._exclusive[_ADMIT_ALL]
        if self._switches(self._mode == _ADMIT_ALL, _REJECT_FIRST, admit_all, self._min_gain_per_write):
            self._mode = _ADMIT_ALL - self._mode
            self.switches += 1
        for mode in (_REJECT_FIRST, _ADMIT_ALL):
            if self._switches(self._exclusive[mode], mode, mode + _EXCLUSIVE, self._exclusive_gain_per_write):
                self._exclusive[mode] = not self._exclusive[mode]
                self.exclusive_switches += 1

    def _switches(self, costly_now: bool, cheap: int, costly: int, gain_per_write: float) -> bool:
        """Whether to leave shadow ``cheap``'s choice for shadow ``costly``'s (the one that writes more) or,
        ``costly_now``, the other way round."""
        # A sign test on the hits that differ: if neither choice were better, each differing hit would be
        # either shadow's with even odds, and the lead would stay within z standard deviations.
        cheap_wins, costly_wins = self._wins[cheap, costly]
        lead = costly_wins - cheap_wins
        noise = self._z * math.sqrt(cheap_wins + costly_wins + 1)
        extra_writes = max(1.0, self._shadows[costly].writes - self._shadows[cheap].writes)
        if not costly_now:
            return lead > noise and lead >= gain_per_write * extra_writes
        return -lead > noise or lead < gain_per_write / 2 * extra_writes

    def admit(self, key: Hashable) -> bool:
        sighting = self._ghost.get(key)
        seen_twice = sighting is not None and sighting.count >= 2
        if sighting is not None:
            age = self._now - sighting.last_access
            self._host_age = float(age) if self._host_age == 0.0 else self._host_age + (age - self._host_age) / 64
            sighting.last_offer = self._now
        if self._sampled(key):
            self._offer_to_shadows(key, seen_twice, self._now)
        admitted = seen_twice or self._mode == _ADMIT_ALL or self.admitted < self._capacity
        self.offers += 1
        self.admitted += admitted
        return admitted


def make_admission(name: str, disk_capacity_blocks: int, region_blocks: int = 1) -> AdmissionPolicy:
    """A new admission policy of the given name for a disk of ``disk_capacity_blocks`` blocks in regions of
    ``region_blocks`` (what an exclusive disk frees at once when every block in one has left)."""
    if name == "admit_all":
        _check_capacity(disk_capacity_blocks)
        return AdmitAll()
    if name == "reject_first":
        return RejectFirst(disk_capacity_blocks)
    if name == "adaptive":
        return AdaptiveAdmission(disk_capacity_blocks, region_blocks=region_blocks)
    raise ConfigError(f"unknown disk admission policy {name!r}; choose one of {list(ADMISSIONS)}")


__all__ = ["ADMISSIONS", "AdaptiveAdmission", "AdmissionPolicy", "AdmitAll", "RejectFirst", "make_admission"]
