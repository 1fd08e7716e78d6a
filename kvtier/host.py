"""The host tier: which block lives in which arena slot, in what state, and who may evict it.

Every slot is free, *writing* (reserved, bytes arriving, not readable) or *ready* (readable). A ready
slot may be pinned by readers (a reference count). The eviction policy sees only ready slots; pinned ones
are passed to it as protected.

Promises:
- Capacity is never exceeded: a block gets a slot only from the free list or by evicting a ready,
  unpinned block.
- ``reserve`` is atomic: every key gets a slot, or ``CapacityError`` and nothing changes.
- A slot being written or read is never evicted and never handed to another key.
- ``on_evict(key, payload)`` is called for every victim before its slot is reused, with the victim's
  bytes still in place (this is where write-back demotes to disk).
- Every method but ``holds`` takes the tier's lock: the tier is safe to share between threads.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from kvtier.arena import HostArena
from kvtier.errors import InvalidInputError
from kvtier.policies import EvictionPolicy


class SlotState(enum.Enum):
    WRITING = "writing"
    READY = "ready"


@dataclass
class _Entry:
    slot: int
    state: SlotState
    readers: int = 0


@dataclass(frozen=True)
class HostTierStats:
    capacity_blocks: int
    used_blocks: int
    writing_blocks: int
    pinned_blocks: int
    evictions: int


EvictHook = Callable[[bytes, torch.Tensor], None]


class HostTier:
    """Slot bookkeeping over a ``HostArena``; see the module docstring for the promises."""

    def __init__(self, arena: HostArena, policy: EvictionPolicy[bytes], block_bytes: int,
                 on_evict: EvictHook | None = None) -> None:
        self.arena = arena
        self.block_bytes = block_bytes
        self._policy = policy
        self._on_evict = on_evict
        self._entries: dict[bytes, _Entry] = {}
        self._pinned: set[bytes] = set()
        self._free = list(range(arena.num_slots - 1, -1, -1))
        self._evictions = 0
        self._lock = threading.RLock()

    @property
    def capacity_blocks(self) -> int:
        return self.arena.num_slots

    def payload(self, slot: int) -> torch.Tensor:
        """The ``block_bytes`` of slot ``slot`` as a uint8 view."""
        return self.arena.slot(slot, self.block_bytes)

    def state(self, key: bytes) -> SlotState | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.state

    def holds(self, key: bytes) -> bool:
        """Whether ``key`` has a slot, without the lock (one dict lookup, atomic): for callers under another
        tier's lock, where taking this one could deadlock with an eviction that demotes; may be stale."""
        return key in self._entries

    def is_ready(self, key: bytes) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.state is SlotState.READY

    def ready_flags(self, keys: Sequence[bytes]) -> list[bool]:
        """``is_ready`` of every key under one acquisition of the lock (lookups of long prompts)."""
        with self._lock:
            entries = self._entries
            return [(entry := entries.get(key)) is not None and entry.state is SlotState.READY for key in keys]

    def room(self) -> int:
        """Slots that can be had now: free ones plus ready, unpinned ones."""
        with self._lock:
            return len(self._free) + len(self._policy) - len(self._pinned)

    def reserve(self, keys: Sequence[bytes], protected: AbstractSet[bytes] = frozenset()) -> list[int]:
        """Give each absent key a slot in the writing state, evicting as needed; all or nothing.

        Neither pinned blocks nor ``protected`` ones are evicted for it (a promotion must not push out the
        rest of the prefix it belongs to).
        """
        with self._lock:
            for key in keys:
                if key in self._entries:
                    raise InvalidInputError("reserve() of a key that is already in the host tier")
            shortfall = len(keys) - len(self._free)
            if shortfall > 0:
                victims = self._policy.evict(shortfall, self._pinned | protected if protected else self._pinned)
                for victim in victims:
                    self._evict(victim)
            slots = [self._free.pop() for _ in keys]
            for key, slot in zip(keys, slots, strict=True):
                self._entries[key] = _Entry(slot, SlotState.WRITING)
            return slots

    def reserve_upto(self, keys: Sequence[bytes]) -> list[int]:
        """Reserve slots for the longest prefix of ``keys`` that fits; the rest get none."""
        with self._lock:
            return self.reserve(keys[: max(0, min(len(keys), self.room()))])

    def _evict(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        if self._on_evict is not None:
            self._on_evict(key, self.payload(entry.slot))
        self._free.append(entry.slot)
        self._evictions += 1

    def commit(self, keys: Sequence[bytes], slots: Sequence[int] | None = None) -> None:
        """Make reserved slots readable and hand them to the eviction policy; see ``_writing_entries``."""
        with self._lock:
            for key, _ in self._writing_entries(keys, slots):
                self._entries[key].state = SlotState.READY
                self._policy.insert(key)

    def abort(self, keys: Sequence[bytes], slots: Sequence[int] | None = None) -> None:
        """Free reserved slots whose bytes never fully arrived; they were never readable."""
        with self._lock:
            for key, entry in self._writing_entries(keys, slots):
                del self._entries[key]
                self._free.append(entry.slot)

    def _writing_entries(self, keys: Sequence[bytes], slots: Sequence[int] | None) -> list[tuple[bytes, _Entry]]:
        """The reservation of each key, all checked before any changes: each must be writing and, where
        ``slots`` are given, in ``slots[i]``. A reservation that ended (committed, aborted) and whose key was
        reserved again since (by a promotion, another writer) is in another slot: committing that one would
        make a block readable while someone else's bytes are still arriving in it."""
        if slots is not None and len(slots) != len(keys):
            raise InvalidInputError(f"{len(slots)} slots for {len(keys)} reserved keys")
        entries: list[tuple[bytes, _Entry]] = []
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None or entry.state is not SlotState.WRITING:
                raise InvalidInputError("commit/abort of a key that is not reserved")
            if slots is not None and entry.slot != slots[i]:
                raise InvalidInputError("commit/abort of a reservation that ended: its key is reserved in another "
                                        "slot now")
            entries.append((key, entry))
        return entries

    def acquire(self, keys: Sequence[bytes]) -> list[int | None]:
        """Pin each ready key for reading and return its slot (``None`` where the key is not ready)."""
        with self._lock:
            return [self._pin(key) for key in keys]

    def acquire_run(self, keys: Sequence[bytes]) -> list[int]:
        """Pin the longest leading run of ready ``keys`` for reading; their slots (the keys after it untouched)."""
        with self._lock:
            slots: list[int] = []
            for key in keys:
                slot = self._pin(key)
                if slot is None:
                    break
                slots.append(slot)
            return slots

    def _pin(self, key: bytes) -> int | None:
        """Under the lock: read-pin ``key`` if it is ready; its slot, else ``None``."""
        entry = self._entries.get(key)
        if entry is None or entry.state is not SlotState.READY:
            return None
        entry.readers += 1
        self._pinned.add(key)
        self._policy.touch(key)
        return entry.slot

    def release(self, keys: Sequence[bytes]) -> None:
        """Drop one read pin of each key (each must have been acquired)."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.readers == 0:
                    raise InvalidInputError("release() of a key that is not acquired")
                entry.readers -= 1
                if entry.readers == 0:
                    self._pinned.discard(key)

    def drop(self, key: bytes) -> bool:
        """Remove a ready, unpinned block without demoting it; False if it is absent, pinned or writing."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state is not SlotState.READY or entry.readers:
                return False
            del self._entries[key]
            self._policy.remove(key)
            self._free.append(entry.slot)
            return True

    def stats(self) -> HostTierStats:
        with self._lock:
            writing = sum(1 for entry in self._entries.values() if entry.state is SlotState.WRITING)
            return HostTierStats(
                capacity_blocks=self.arena.num_slots,
                used_blocks=len(self._entries),
                writing_blocks=writing,
                pinned_blocks=len(self._pinned),
                evictions=self._evictions,
            )

