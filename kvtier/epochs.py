"""Key epochs: one counter per scope that callers mix into the keys they derive, to drop a scope's blocks at once.

A caller (an engine connector) derives its block keys under the current epoch of its scope (a string it
chooses, such as a model's namespace). ``advance`` makes every key derived under an older epoch unreachable:
nothing is deleted, the old blocks simply stop being asked for and age out of every tier by eviction.

Promises:
- ``get(scope)`` is 0 until the scope is first advanced; ``advance(scope)`` returns the new epoch, greater
  than the last and never below the wall clock in microseconds, and never hands out the same value twice for
  a scope, also across restarts: when a disk tier persists the epochs (its index records the new value,
  synced, before ``advance`` returns), and when none does, unless the clock went back (a restarted store
  has forgotten its epochs, but a client that has not noticed the restart still writes blocks under the
  old epoch's keys into it: were that epoch handed out again, those blocks would be found after the reset).
- A scope is a non-empty string of at most ``MAX_SCOPE_BYTES`` UTF-8 bytes; anything else is an
  ``InvalidInputError`` and changes nothing.
- Thread-safe: concurrent advances of one scope each get a distinct epoch.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from kvtier.errors import InvalidInputError

MAX_SCOPE_BYTES = 256


class EpochRecord(Protocol):
    """Where epochs persist (the disk tier's index)."""

    def read_epochs(self) -> dict[str, int]: ...

    def write_epoch(self, scope: str, epoch: int) -> None: ...


def check_scope(scope: object) -> str:
    """``scope`` if it names an epoch scope; ``InvalidInputError`` otherwise."""
    if not isinstance(scope, str) or not scope or len(scope.encode()) > MAX_SCOPE_BYTES:
        raise InvalidInputError(f"an epoch scope is a non-empty string of at most {MAX_SCOPE_BYTES} bytes, "
                                f"got {scope!r:.80}")
    return scope


class KeyEpochs:
    """The epochs of a store, kept in memory and written through to ``record`` (if any)."""

    def __init__(self, record: EpochRecord | None = None) -> None:
        self._lock = threading.Lock()
        self._record = record
        self._epochs = record.read_epochs() if record is not None else {}

    def get(self, scope: str) -> int:
        scope = check_scope(scope)
        with self._lock:
            return self._epochs.get(scope, 0)

    def advance(self, scope: str) -> int:
        scope = check_scope(scope)
        with self._lock:
            # The clock floor: a store that lost its epochs in a restart never hands out its predecessor's again.
            epoch = max(self._epochs.get(scope, 0) + 1, time.time_ns() // 1_000)
            if self._record is not None:
                self._record.write_epoch(scope, epoch)
            self._epochs[scope] = epoch
            return epoch
