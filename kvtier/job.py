"""Handles on asynchronous puts and gets.

Promises:
- A job is done when every block it covers was copied, or failed, or was skipped; ``wait`` returns a
  ``JobResult`` naming the indices (into the call's keys) that failed. A failed block is never half-visible:
  a failed put leaves no readable block under its key, a failed get leaves the caller's tensor for that
  index unspecified and says so.
- ``done()`` never blocks; ``wait(timeout)`` raises ``JobTimeoutError`` on timeout and the job goes on.
  ``wait`` may first run, on the waiting thread, copies of the job that no worker has started.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from kvtier.errors import JobTimeoutError

_job_ids = itertools.count(1)
JobKind = Literal["put", "get"]


@dataclass(frozen=True)
class JobResult:
    kind: JobKind
    num_blocks: int
    failed: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def num_succeeded(self) -> int:
        return self.num_blocks - len(self.failed)


class Job:
    """One put or get; built by the store, completed by transfer and disk callbacks."""

    def __init__(self, kind: JobKind, num_blocks: int, poll: Callable[[], int] | None) -> None:
        """``poll`` runs a backend's completions (CUDA); ``None`` where completions arrive by themselves."""
        self.id = next(_job_ids)
        self.kind = kind
        self.num_blocks = num_blocks
        self._poll = poll
        self._failed: set[int] = set()
        self._parts_left = 1  # the submitting call itself, finished by ``seal``
        self._cond = threading.Condition()
        self._helpers: list[Callable[[], None]] = []

    def add_helper(self, helper: Callable[[], None]) -> None:
        """``helper()`` is run by ``wait`` before it sleeps: copies the waiter may run itself (``Transfer.help``)."""
        self._helpers.append(helper)

    def add_parts(self, count: int = 1) -> None:
        with self._cond:
            self._parts_left += count

    def part_done(self, failed: Iterable[int] = ()) -> None:
        with self._cond:
            self._failed.update(failed)
            self._parts_left -= 1
            if self._parts_left == 0:
                self._cond.notify_all()

    def fail(self, indices: Iterable[int]) -> None:
        with self._cond:
            self._failed.update(indices)

    def seal(self) -> Job:
        """Called once by the store after it queued every part."""
        self.part_done()
        return self

    def done(self) -> bool:
        if self._poll is not None:
            self._poll()
        with self._cond:
            return self._parts_left == 0

    def wait(self, timeout: float | None = None) -> JobResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        for helper in self._helpers:
            helper()
        with self._cond:
            if self._poll is None:
                # Completions are pushed (CPU workers): sleep until the last part notifies, no wake-ups between.
                while self._parts_left:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._timeout(timeout)
                    self._cond.wait(remaining)
                return self._result()
        # A CUDA backend completes on poll: poll before the first wait, then wait 10 us, 20 us, ... up to
        # 1 ms between polls, so that a restore of a few blocks pays microseconds, a long one no busy loop.
        self._poll()
        pause = 1e-5
        with self._cond:
            while self._parts_left:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._timeout(timeout)
                self._cond.wait(pause if remaining is None else min(remaining, pause))
                pause = min(2 * pause, 1e-3)
                self._cond.release()
                try:
                    self._poll()
                finally:
                    self._cond.acquire()
            return self._result()

    def _timeout(self, timeout: float | None) -> JobTimeoutError:
        return JobTimeoutError(f"{self.kind} job {self.id} not done after {timeout} s")

    def _result(self) -> JobResult:
        return JobResult(self.kind, self.num_blocks, tuple(sorted(self._failed)))

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind}, num_blocks={self.num_blocks}, done={self.done()})"
