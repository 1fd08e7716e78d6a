"""Least recently used: evicts the key whose last insert or touch is oldest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set

from kvtier.policies.base import EvictionPolicy, K


class LRUPolicy(EvictionPolicy[K]):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        self._order[key] = None

    def touch(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def _evict_unchecked(self, n: int, protected: Set[K]) -> list[K]:
        victims: list[K] = []
        for key in self._order:
            if key not in protected:
                victims.append(key)
                if len(victims) == n:
                    break
        for key in victims:
            del self._order[key]
        return victims

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
