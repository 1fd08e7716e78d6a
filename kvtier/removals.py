"""The store's log of removed keys: which keys left every tier, for clients that mirror what the store holds.

A key is removed when no tier of the store holds it any more: a host eviction no lower tier took, a disk
region evicted (or lost to a write error, or a block dropped) while neither the host nor another lower tier
holds the key, a promotion that failed with the key gone below. A demotion (host to disk) is not a removal;
an epoch advance removes nothing (the old keys age out by eviction, each logged then). A shared tier's own
evictions (a remote server's) are not seen: its copy counts as held while the tier says it holds the key.

Promises:
- ``record`` numbers the keys it appends: the first key ever recorded is 0, each next one one more.
- ``since(seq)`` returns every key numbered ``seq`` or later that is still kept, and the next number.
- Bounded: the last ``capacity`` keys are kept. A reader that fell behind (``seq`` older than the oldest key
  kept) or that asks a log it did not read before (``seq`` past the next number: a restarted store) gets
  ``overflowed=True`` and no keys, and must assume that any key it knew may be gone.
- ``log_id`` names the log (random per store instance): a reader that sees it change (a restarted daemon)
  must treat it as an overflow too, since the new log's numbers may have passed its ``seq`` already.
- Thread-safe with a lock of its own that it never holds while calling out: ``record`` may be called under
  any tier's lock.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from kvtier.errors import InvalidInputError

# About 3 MiB of 16-byte keys: minutes of evictions at the host tier's pace, for a reader polling every step.
DEFAULT_CAPACITY_KEYS = 1 << 16


@dataclass(frozen=True)
class Removals:
    """Keys removed from ``seq`` on (in order); ``next_seq`` is the ``seq`` of the next read."""

    next_seq: int
    keys: tuple[bytes, ...]
    overflowed: bool
    log_id: str


class RemovalLog:
    """A bounded, sequence-numbered log of removed keys (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY_KEYS) -> None:
        if capacity < 1:
            raise InvalidInputError(f"a removal log keeps at least one key, not {capacity}")
        self._keys: deque[bytes] = deque(maxlen=capacity)
        self._next = 0
        self._lock = threading.Lock()
        self.log_id = secrets.token_hex(8)

    def record(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._keys.append(key)
                self._next += 1

    def since(self, seq: int) -> Removals:
        """The keys numbered ``seq`` or later; ``overflowed`` (and no keys) when some are forgotten or ``seq`` is
        not of this log."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidInputError(f"'seq' must be a non-negative int, got {seq!r}")
        with self._lock:
            first = self._next - len(self._keys)
            overflowed = seq < first or seq > self._next
            if overflowed:
                return Removals(self._next, (), True, self.log_id)
            # The newest ``_next - seq`` keys, read from the end: a reader that keeps up copies only those.
            newest = list(itertools.islice(reversed(self._keys), self._next - seq))
            return Removals(self._next, tuple(reversed(newest)), False, self.log_id)
