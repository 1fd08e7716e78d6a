"""S3-FIFO (Yang et al., SOSP 2023): a small probation FIFO, a main FIFO and a ghost FIFO.

New keys enter the small queue (10% of capacity). A key leaving the small queue moves to the main queue
if it was read while there, else it is dropped and remembered as a ghost; a ghost that comes back enters
the main queue directly. The main queue is a FIFO with a 2-bit frequency: a read key is reinserted with
its frequency decremented instead of being evicted. Protected keys are rotated past, never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set

from kvtier.policies.base import EvictionPolicy, K

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy[K]):
    name = "s3fifo"

    def __init__(self, capacity: int, small_ratio: float = 0.1) -> None:
        super().__init__(capacity)
        # A float so that a subclass may move it by fractions of a block (``AdaptiveS3FIFOPolicy``).
        self._small_target: float = max(1, int(capacity * small_ratio))
        self._small: OrderedDict[K, int] = OrderedDict()
        self._main: OrderedDict[K, int] = OrderedDict()
        self._ghost: OrderedDict[K, None] = OrderedDict()
        self._ghost_capacity = max(1, capacity - self._small_target)

    def insert(self, key: K) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def touch(self, key: K) -> None:
        if key in self._small:
            self._small[key] = min(self._small[key] + 1, _MAX_FREQ)
        elif key in self._main:
            self._main[key] = min(self._main[key] + 1, _MAX_FREQ)

    def remove(self, key: K) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)

    def _remember_ghost(self, key: K) -> None:
        self._ghost[key] = None
        while len(self._ghost) > self._ghost_capacity:
            self._ghost.popitem(last=False)

    def _evict_one(self, protected: Set[K]) -> K:
        while True:
            small_turn = self._small and (len(self._small) >= self._small_target or not self._main)
            if small_turn and self._evictable_in(self._small, protected):
                victim = self._evict_small(protected)
                if victim is not None:
                    return victim
                continue
            victim = self._evict_main(protected)
            if victim is not None:
                return victim

    @staticmethod
    def _evictable_in(queue: OrderedDict[K, int], protected: Set[K]) -> bool:
        return any(key not in protected for key in queue)

    def _evict_small(self, protected: Set[K]) -> K | None:
        """Take the small queue's oldest unprotected key: promote it if it was read, else evict it."""
        for key, freq in self._small.items():
            if key in protected:
                continue
            del self._small[key]
            if freq > 0:
                self._main[key] = 0
                return None
            self._remember_ghost(key)
            return key
        return None

    def _evict_main(self, protected: Set[K]) -> K | None:
        """One step of the main queue's clock: evict a cold key or give a warm one another round."""
        if not self._main or not self._evictable_in(self._main, protected):
            # Only protected keys remain in main: the victim must come from the small queue.
            return self._evict_small_forced(protected)
        key, freq = next(iter(self._main.items()))
        del self._main[key]
        if key in protected or freq > 0:
            self._main[key] = max(freq - 1, 0) if key not in protected else freq
            return None
        self._left_main(key)
        return key

    def _left_main(self, key: K) -> None:
        """``key`` was evicted from the main queue. S3-FIFO, as published, remembers only the small queue's
        evictions; ``AdaptiveS3FIFOPolicy`` remembers these too, to learn the queues' split."""

    def _evict_small_forced(self, protected: Set[K]) -> K | None:
        for key in self._small:
            if key not in protected:
                del self._small[key]
                self._remember_ghost(key)
                return key
        return None

    def _evict_unchecked(self, n: int, protected: Set[K]) -> list[K]:
        return [self._evict_one(protected) for _ in range(n)]

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main

    def __len__(self) -> int:
        return len(self._small) + len(self._main)
