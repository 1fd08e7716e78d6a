"""The transfer engine contract: copy jobs in, completions out, one interface for every backend.

A job is a list of ``(dst, src)`` tensor pairs of equal byte size and a direction:

- ``LOAD`` moves host-tier bytes to a caller (a restore, on the engine's critical path: served first);
- ``STORE`` moves a caller's bytes into the host tier (a save, in the background).

Promises:
- ``submit`` never waits for a copy: it queues the job and returns a ``Transfer`` handle.
- Each job's ``on_done(error)`` is called exactly once, with ``None`` after every pair was copied or with
  the exception that stopped it. It is called from a worker thread (CPU backend) or from whichever thread
  polls (CUDA backend, in ``poll``/``Transfer.done``/``Transfer.wait``).
- Loads are preferred over queued stores. Completion order between jobs is the backend's (the CUDA one
  keeps submission order per direction); the store never relies on it, since a block becomes readable only
  after its own job completed.
- After ``close`` no job is accepted (``ClosedError``); queued jobs are finished first.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from kvtier.errors import InvalidInputError

CopyPair = tuple[torch.Tensor, torch.Tensor]
DoneCallback = Callable[[BaseException | None], None]


class Direction(enum.IntEnum):
    """The value is the priority: lower is served first."""

    LOAD = 0
    STORE = 1


class Transfer(ABC):
    """A handle on one submitted job."""

    @abstractmethod
    def done(self) -> bool:
        """True once the job's ``on_done`` has run."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until done or ``timeout`` seconds passed; returns ``done()``."""


class TransferEngine(ABC):
    """Moves bytes between caller memory and the host arena asynchronously."""

    name: str = ""

    @abstractmethod
    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        """Queue the copies ``dst.copy_(src)`` of every pair; see the module promises."""

    @abstractmethod
    def poll(self) -> int:
        """Run the callbacks of jobs that finished; returns how many did."""

    @abstractmethod
    def close(self) -> None:
        """Finish queued jobs and stop; idempotent."""


def check_pairs(pairs: Sequence[CopyPair]) -> None:
    for dst, src in pairs:
        if dst.nbytes != src.nbytes:
            raise InvalidInputError(f"copy of {src.nbytes} bytes into {dst.nbytes} bytes")
