"""The eviction policy contract shared by the host tier and the trace replay.

A policy only orders keys; it never owns memory. Its primitives:

- ``insert(key)``: ``key`` became resident (it must not be resident already).
- ``touch(key)``: ``key`` was read (a hit).
- ``remove(key)``: ``key`` left for another reason than eviction (dropped, moved to another tier).
- ``evict(n, protected)``: choose and remove exactly ``n`` resident keys, none of them in ``protected``,
  and return them; if that is impossible raise ``CapacityError`` and change nothing (atomic contract).

Policies may keep ghost entries (keys seen and evicted) to learn from; ghosts are never resident, never
returned by ``evict`` and never counted in ``len()``. ``capacity`` (in blocks) sizes the ghosts and the
internal queues; the owner, not the policy, decides when to evict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Set
from typing import Generic, TypeVar

from kvtier.errors import CapacityError, ConfigError

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Orders resident keys and picks eviction victims; see the module docstring for the contract."""

    name: str = ""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"a policy's capacity must be at least 1 block, got {capacity}")
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: K) -> None: ...

    @abstractmethod
    def touch(self, key: K) -> None: ...

    @abstractmethod
    def remove(self, key: K) -> None: ...

    @abstractmethod
    def _evict_unchecked(self, n: int, protected: Set[K]) -> list[K]:
        """Evict ``n`` keys outside ``protected``; called only when that many exist."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def evict(self, n: int, protected: Set[K] = frozenset()) -> list[K]:
        """Remove and return exactly ``n`` resident keys outside ``protected``, or raise and change nothing."""
        if n < 0:
            raise ValueError(f"cannot evict a negative number of keys ({n})")
        if n == 0:
            return []
        num_protected = sum(1 for key in protected if key in self)
        if len(self) - num_protected < n:
            raise CapacityError(
                f"cannot evict {n} blocks: {len(self)} resident, {num_protected} of them pinned or in flight"
            )
        return self._evict_unchecked(n, protected)
