"""The transfer engine contract: copy jobs in, completions out, one interface for every backend.

A job is a list of ``(dst, src)`` tensor pairs of equal byte size and a direction:

- ``LOAD`` moves host-tier bytes to a caller (a restore, on the engine's critical path: served first);
- ``STORE`` moves a caller's bytes into the host tier (a save, in the background).

``submit_blocks`` is the batched form the store uses: whole blocks between arena rows (``HostArena.rows()``)
and caller tensors, one submission however many blocks. Its default builds the pairs and calls
``submit``; backends override it to skip the per-block work (the CPU one copies raw pointers, the CUDA one
launches one kernel where the arena is registered).

Promises:
- ``submit`` never waits for a copy: it queues the job and returns a ``Transfer`` handle.
- A job copies what the submitting thread's queued device work left in its tensors, and writes them
  only after that work (on CUDA: after the caller's current stream; see ``fence`` for another thread).
- Each job's ``on_done(error)`` is called exactly once, with ``None`` after every pair was copied or with
  the exception that stopped it. It is called from a worker thread (CPU backend) or from whichever thread
  polls (CUDA backend, in ``poll``/``Transfer.done``/``Transfer.wait``).
- ``Transfer.help`` may run parts of a job on the thread that calls it (one about to wait for the job
  anyway); ``on_done`` then runs there if that part is the last.
- Loads are preferred over queued stores. Completion order between jobs is the backend's (the CUDA one
  keeps submission order per direction); the store never relies on it, since a block becomes readable only
  after its own job completed.
- After ``close`` no job is accepted (``ClosedError``); queued jobs are finished first.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from kvtier.errors import InvalidInputError

_LOG = logging.getLogger(__name__)

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

    def help(self) -> None:  # noqa: B027 (a no-op by default, not abstract: only CPU backends have work to lend)
        """Run on the calling thread the parts of this job no worker has started (a waiter lends its core).

        Never waits for a part another thread runs. The default, for backends whose copies are not CPU
        work (CUDA), does nothing.
        """


class TransferEngine(ABC):
    """Moves bytes between caller memory and the host arena asynchronously."""

    name: str = ""
    # False where workers run ``on_done`` themselves: a waiter then sleeps until notified instead of polling.
    completes_on_poll: bool = True

    @abstractmethod
    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        """Queue the copies ``dst.copy_(src)`` of every pair; see the module promises."""

    def fence(self, tensors: Sequence[torch.Tensor]) -> object | None:
        """A mark of the work the calling thread has queued so far on ``tensors``' device, for ``after=``.

        A job is ordered after its submitter's queued work; one submitted later from another thread (a
        get finished after a promotion) passes the fence its requester took. ``None`` where there is no
        device queue to order after (the CPU backend).
        """
        return None

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer:
        """Copy ``blocks[i]`` into the start of ``rows[slots[i]]`` (``STORE``) or back (``LOAD``), as one job.

        ``rows`` is a ``(num_slots, slot_bytes)`` uint8 view; every block is a contiguous tensor of the same
        byte size, at most ``slot_bytes``. ``after`` is a ``fence`` to order the job after instead of the
        calling thread's queued work.
        """
        nbytes = check_blocks(rows, slots, blocks)
        slot_views = [rows[slot, :nbytes] for slot in slots]
        flat = [block.reshape(-1).view(torch.uint8) for block in blocks]
        pairs = list(zip(flat, slot_views, strict=True)) if direction is Direction.LOAD else list(
            zip(slot_views, flat, strict=True))
        return self.submit(pairs, direction, on_done)

    @abstractmethod
    def poll(self) -> int:
        """Run the callbacks of jobs that finished; returns how many did."""

    @abstractmethod
    def close(self) -> None:
        """Finish queued jobs and stop; idempotent."""


def submit_or_fail(engine: TransferEngine, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                   direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer | None:
    """``engine.submit_blocks(...)``, except that an error while queuing the job (a closed engine, a kernel that
    would not launch, no device memory for its tables) goes to ``on_done`` at once, as a failed copy's would,
    and ``None`` is returned: the caller's reservations are aborted or its pins released there, and its job's
    part ends instead of waiting forever. Bad arguments (``InvalidInputError``) are raised too, after that."""
    try:
        if after is None:
            return engine.submit_blocks(rows, slots, blocks, direction, on_done)
        return engine.submit_blocks(rows, slots, blocks, direction, on_done, after=after)
    except Exception as exc:
        _LOG.warning("a copy of %d block(s) could not be queued: %s", len(blocks), exc)
        on_done(exc)
        if isinstance(exc, InvalidInputError):
            raise
        return None


def check_pairs(pairs: Sequence[CopyPair]) -> None:
    for dst, src in pairs:
        if dst.nbytes != src.nbytes:
            raise InvalidInputError(f"copy of {src.nbytes} bytes into {dst.nbytes} bytes")


def check_blocks(rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor]) -> int:
    """The byte size of every block of a ``submit_blocks`` call, or ``InvalidInputError``."""
    if len(slots) != len(blocks):
        raise InvalidInputError(f"{len(slots)} slots for {len(blocks)} blocks")
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.stride(1) != 1:
        raise InvalidInputError("rows must be a (num_slots, slot_bytes) uint8 view")
    if slots and (min(slots) < 0 or max(slots) >= rows.shape[0]):
        raise InvalidInputError(f"a slot lies outside [0, {rows.shape[0]})")
    nbytes = blocks[0].nbytes if blocks else 0
    if nbytes > rows.shape[1] or any(block.nbytes != nbytes or not block.is_contiguous() for block in blocks):
        raise InvalidInputError(f"blocks must be contiguous, of one size, at most {rows.shape[1]} bytes")
    return nbytes
