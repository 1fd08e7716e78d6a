"""ARC (Megiddo and Modha, FAST 2003): adapts between recency and frequency with two ghost lists.

``T1`` holds keys seen once recently, ``T2`` keys seen at least twice; ``B1`` and ``B2`` remember keys
evicted from each. A key that comes back from ``B1`` says recency was starved, so the target size ``p``
of ``T1`` grows; one from ``B2`` shrinks it. ``evict`` takes the LRU end of ``T1`` while ``T1`` is over
its target, else of ``T2``, skipping protected keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set

from kvtier.policies.base import EvictionPolicy, K


class ARCPolicy(EvictionPolicy[K]):
    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[K, None] = OrderedDict()
        self._t2: OrderedDict[K, None] = OrderedDict()
        self._b1: OrderedDict[K, None] = OrderedDict()
        self._b2: OrderedDict[K, None] = OrderedDict()
        self._target_t1 = 0.0

    def insert(self, key: K) -> None:
        if key in self._b1:
            self._target_t1 = min(float(self.capacity), self._target_t1 + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._target_t1 = max(0.0, self._target_t1 - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None

    def touch(self, key: K) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: K) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    @staticmethod
    def _oldest_unprotected(queue: OrderedDict[K, None], protected: Set[K]) -> K | None:
        for key in queue:
            if key not in protected:
                return key
        return None

    def _evict_one(self, protected: Set[K]) -> K:
        prefer_t1 = bool(self._t1) and (len(self._t1) > self._target_t1 or not self._t2)
        first, second = ((self._t1, self._b1), (self._t2, self._b2)) if prefer_t1 else (
            (self._t2, self._b2), (self._t1, self._b1))
        for resident, ghosts in (first, second):
            victim = self._oldest_unprotected(resident, protected)
            if victim is not None:
                del resident[victim]
                ghosts[victim] = None
                self._trim_ghosts()
                return victim
        raise AssertionError("evict() checked that an unprotected key exists")

    def _trim_ghosts(self) -> None:
        while self._b1 and len(self._t1) + len(self._b1) > self.capacity:
            self._b1.popitem(last=False)
        while self._b2 and len(self) + len(self._b1) + len(self._b2) > 2 * self.capacity:
            self._b2.popitem(last=False)

    def _evict_unchecked(self, n: int, protected: Set[K]) -> list[K]:
        return [self._evict_one(protected) for _ in range(n)]

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)
