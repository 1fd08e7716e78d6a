"""The write-through queue: committed host blocks waiting for their offer to the write-through tiers.

A commit (``Store.commit``, a put's completion) read-pins its blocks' host slots under the store's lock and
hands ``(key, slot)`` pairs to ``put``; one background thread of the queue offers them in order (``offer``,
the store's ``TierChain.write_through``: a local disk tier checksums and copies the block, and waits for
room when its writer is behind). The committing thread returns without copying, so a cache miss costs
its recompute and a memcpy into the arena, not a disk write.

Primitives: ``put(pairs, deadline)`` (back-pressure), ``drain()`` (``Store.flush``), ``close(deadline)``
(``Store.close``), ``stats()``.

Promises:
- The queue holds at most ``capacity_blocks`` pairs, counting the one being offered. A ``put`` beyond that
  waits for room until its ``deadline`` (``time.monotonic`` seconds); the pairs still waiting then are not
  written through: their pins are dropped (``unpin``) and they are counted in ``skipped_blocks``. Their
  host copies stay and are demoted on eviction, as in write-back mode: nothing is lost but the early
  disk copy. Pinned slots cannot be evicted, so the host pool has up to ``capacity_blocks`` fewer slots
  to give (plus those of the puts waiting for room).
- A pair is offered exactly once or unpinned exactly once, never both: ``offer`` takes over its pin (the
  store's offer releases it when no tier borrows the payload any more, also when a tier raises). A raising
  ``offer`` is counted in ``failed_blocks`` (the first one logged) and the thread goes on.
- ``put`` never runs an offer, and the queue never calls ``offer`` or ``unpin`` holding its own lock: the
  caller must not hold the store's lock around ``put`` (an ``unpin`` takes it).
- ``drain`` returns once every pair put before it was offered (or skipped). ``close`` refuses later puts
  (their pairs are skipped), waits for the queue to drain until its deadline, then stops the thread; past
  the deadline it skips what is still queued, logs a warning, leaves the thread to finish the offer in
  flight on its own, and returns ``False``, never hanging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteThroughStats:
    queued_blocks: int  # waiting or being offered now
    skipped_blocks: int  # never offered: no room before the deadline, or the queue closed
    failed_blocks: int  # whose offer raised


class WriteThroughQueue:
    """Pinned ``(key, slot)`` pairs offered by one background thread; see the module docstring."""

    def __init__(self, capacity_blocks: int, offer: Callable[[bytes, int], None],
                 unpin: Callable[[bytes], None]) -> None:
        self.capacity_blocks = max(1, capacity_blocks)
        self._offer = offer
        self._unpin = unpin
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[tuple[bytes, int]] = deque()
        self._offering = 0  # pairs taken by the thread whose offer has not returned (0 or 1)
        self._closed = False
        self._skipped_blocks = 0
        self._failed_blocks = 0
        self._thread = threading.Thread(target=self._run, name="kvtier-write-through", daemon=True)
        self._thread.start()

    def _queued_locked(self) -> int:
        return len(self._pending) + self._offering

    def put(self, pairs: Sequence[tuple[bytes, int]], deadline: float) -> int:
        """Queue ``pairs`` (slots the caller read-pinned) in order, waiting for room until ``deadline``; how
        many were skipped (unpinned and counted) for lack of room or because the queue is closed."""
        skipped: Sequence[tuple[bytes, int]] = ()
        with self._cond:
            for n, pair in enumerate(pairs):
                while not self._closed and self._queued_locked() >= self.capacity_blocks:
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:
                        break
                    self._cond.wait(left_s)
                if self._closed or self._queued_locked() >= self.capacity_blocks:
                    skipped = pairs[n:]
                    self._skipped_blocks += len(skipped)
                    break
                self._pending.append(pair)
                self._cond.notify_all()
        for key, _ in skipped:
            self._unpin(key)
        return len(skipped)

    def drain(self, deadline: float) -> bool:
        """Wait until every pair queued so far was offered or skipped, at most until ``deadline``
        (``time.monotonic``); whether it drained."""
        with self._cond:
            while self._queued_locked():
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return False
                self._cond.wait(left_s)
            return True

    def close(self, deadline: float) -> bool:
        """Refuse new pairs, offer the queued ones until ``deadline``, stop the thread; whether it drained.

        Idempotent. Past the deadline the pairs not yet offered are skipped (unpinned, counted).
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._queued_locked() and (left_s := deadline - time.monotonic()) > 0:
                self._cond.wait(left_s)
            left = list(self._pending)
            self._pending.clear()
            self._skipped_blocks += len(left)
            stuck = self._offering
        for key, _ in left:
            self._unpin(key)
        if left or stuck:
            _LOG.warning("write-through: close gave up waiting for the disk or remote tier: %d block(s) not "
                         "written through, %d offer still running", len(left), stuck)
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return True

    def stats(self) -> WriteThroughStats:
        with self._cond:
            return WriteThroughStats(self._queued_locked(), self._skipped_blocks, self._failed_blocks)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                key, slot = self._pending.popleft()
                self._offering = 1
            try:
                self._offer(key, slot)
            except Exception:  # a tier's failure costs this block its early copy, never the thread
                with self._cond:
                    self._failed_blocks += 1
                    first = self._failed_blocks == 1
                if first:
                    _LOG.exception("write-through: an offer failed (later failures are counted only)")
            finally:
                with self._cond:
                    self._offering = 0
                    self._cond.notify_all()
