"""The CPU transfer backend: worker threads copy, each job split across the workers.

Promises (beyond ``kvtier.transfer.base``): loads queued behind stores jump ahead of them; a job's pairs are
cut into one contiguous share per worker and copied in parallel, and its ``on_done`` runs once, after the
last share, with the first exception any share raised (never lost). Plain CPU-to-CPU copies of equal
layout are a ``memmove`` through NumPy, which releases the GIL: torch's ``copy_`` called from a thread
other than the main one ran at about 60% of its main-thread speed here (its intra-op pool is the main
thread's). Anything else (other devices, dtypes or strides) goes through ``Tensor.copy_``.
``submit_blocks`` between CPU tensors and arena rows copies raw addresses with ``memmove`` (ctypes, GIL
released): about a microsecond of Python per block instead of ten; the job holds the tensors until done.
Its bytes, not its blocks, are cut into the workers' shares (page-aligned, at least ``MIN_SHARE_BYTES``
each), so one large block (a connector's usual call) is copied by every worker, and a small job wakes one.
Queued shares wait in one deque per direction behind a C ``SimpleQueue`` of wake-up tokens: a hand-off
costs one futex wake, not a Python ``Condition`` round (``PriorityQueue``), which on a loaded VM was a
large part of a one-block call. ``Transfer.help`` runs one share of the job that no worker has picked up yet on
the calling thread: a caller about to wait copies instead of sleeping while a worker wakes up (tens to hundreds
of microseconds on a loaded VM), so a one-chunk put or get that is waited for costs about what the same
bytes cost copied by that many threads. That share (the last) is ``WAITER_SHARE_WEIGHT`` times the others, so
the waiter usually finishes last and completes the job itself rather than being woken. A waiter on the main
thread that finds every share of its job still queued (the workers, woken, wait for the GIL it holds) takes
them all and, for blocks of at least ``WHOLE_MIN_BLOCK_BYTES``, copies the job with ``Tensor.copy_`` on its
own thread, which torch splits over its intra-op pool without a Python thread's wake-up: one 8 MiB chunk
waited for went from about 0.43 to 0.3 ms here.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from kvtier.errors import ClosedError
from kvtier.transfer.base import (
    CopyPair,
    Direction,
    DoneCallback,
    Transfer,
    TransferEngine,
    check_blocks,
    check_pairs,
)


class _CpuTransfer(Transfer):
    def __init__(self, num_shares: int, on_done: DoneCallback, steal: Callable[[_CpuTransfer], None],
                 whole: Callable[[], None] | None = None) -> None:
        self._steal = steal
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self.num_shares = num_shares
        self._shares_left = num_shares
        self._error: BaseException | None = None
        self._on_done = on_done
        # The whole job as one call on the calling thread, for a waiter that finds every share still queued.
        self.whole = whole

    def share_done(self, error: BaseException | None) -> None:
        with self._lock:
            self._error = self._error or error
            self._shares_left -= 1
            if self._shares_left:
                return
        try:
            self._on_done(self._error)
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def help(self) -> None:
        if not self._finished.is_set():
            self._steal(self)


_Task = tuple[Callable[[], None], _CpuTransfer]
# A share smaller than this costs more to hand to another thread than to copy on the one that has it.
MIN_SHARE_BYTES = 1 << 20
_SHARE_ALIGN = 4096
# The last share, the one ``help`` runs on a waiting caller, is this much larger than the workers': a worker
# starts its share only after a wake-up, so the waiter finishes last and completes the job on its own thread
# instead of sleeping until a worker's completion wakes it (20-40 us a call on a loaded VM). Where memory
# bandwidth, not a thread, is the limit, the larger share costs no time: the waiter copies alone at the end.
WAITER_SHARE_WEIGHT = 1.3
# Blocks at least this large are copied by a waiter that finds its whole job queued as one ``whole`` call
# (torch's pool). Smaller ones stay in shares: a ``copy_`` costs about 10 us of dispatch per block, which
# took 256 KiB blocks from 0.66x to 0.52x of the best raw copy here (1 MiB: even; 4 MiB: +5%).
WHOLE_MIN_BLOCK_BYTES = 2 << 20


def _as_bytes(tensor: torch.Tensor) -> npt.NDArray[np.uint8]:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def copy_pair(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, as a GIL-free ``memmove`` where both are CPU tensors of one dtype and shape."""
    if (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype and dst.shape == src.shape
            and dst.is_contiguous() and src.is_contiguous()):
        np.copyto(_as_bytes(dst), _as_bytes(src))
    else:
        dst.copy_(src)


def _copy_pairs(pairs: Sequence[CopyPair]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            copy_pair(dst, src)


def _memmove_all(segments: Sequence[tuple[int, int, int]], owners: object) -> None:
    """``memmove`` each ``(dst, src, nbytes)``; ``owners`` keeps the memory alive until the copies are done."""
    memmove = ctypes.memmove
    for dst, src, nbytes in segments:
        memmove(dst, src, nbytes)


def _copy_blocks_on_caller(rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                           direction: Direction, nbytes: int) -> None:
    """Every block of a ``submit_blocks`` job through ``Tensor.copy_`` on this thread: torch splits each copy
    over its intra-op pool, whose threads take work without a Python thread's wake-up."""
    for slot, block in zip(slots, blocks, strict=True):
        row, flat = rows[slot, :nbytes], block.reshape(-1).view(torch.uint8)
        if direction is Direction.LOAD:
            flat.copy_(row)
        else:
            row.copy_(flat)


def cut_segments(dsts: Sequence[int], srcs: Sequence[int], nbytes: int, num_shares: int,
                 last_share_weight: float = 1.0) -> list[list[tuple[int, int, int]]]:
    """The copies of ``nbytes`` from each ``srcs[i]`` to ``dsts[i]``, as ``num_shares`` runs of bytes: equal ones,
    but the last ``last_share_weight`` times the others.

    A block may be split between two shares; cuts fall on ``_SHARE_ALIGN`` boundaries of the job's bytes.
    """
    total = len(dsts) * nbytes
    weight = num_shares - 1 + last_share_weight
    bounds = [min(total, int(total * i / weight) // _SHARE_ALIGN * _SHARE_ALIGN) for i in range(num_shares)]
    shares: list[list[tuple[int, int, int]]] = []
    for start, stop in itertools.pairwise([*bounds, total]):
        segments: list[tuple[int, int, int]] = []
        position = start
        while position < stop:
            index, offset = divmod(position, nbytes)
            length = min(nbytes - offset, stop - position)
            segments.append((dsts[index] + offset, srcs[index] + offset, length))
            position += length
        shares.append(segments)
    return shares


def _run(task: _Task) -> None:
    work, transfer = task
    error: BaseException | None = None
    try:
        work()
    except Exception as exc:  # delivered to the job's owner, who turns it into failed blocks
        error = exc
    transfer.share_done(error)


class CpuTransferEngine(TransferEngine):
    name = "cpu"
    completes_on_poll = False

    def __init__(self, num_workers: int = 2) -> None:
        self._num_workers = num_workers
        # One token per queued share (``None``: a worker stops); the shares wait in ``_work[direction]``.
        self._tokens: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        self._work: tuple[deque[_Task], ...] = tuple(deque() for _ in Direction)
        self._closed = False
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._serve, name=f"kvtier-copy-{i}", daemon=True) for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        check_pairs(pairs)
        num_shares = max(1, min(self._num_workers, len(pairs)))
        bounds = [len(pairs) * i // num_shares for i in range(num_shares + 1)]
        return self._queue_shares([functools.partial(_copy_pairs, pairs[start:stop])
                                   for start, stop in itertools.pairwise(bounds)], direction, on_done)

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer:
        nbytes = check_blocks(rows, slots, blocks)
        if rows.device.type != "cpu" or any(block.device.type != "cpu" for block in blocks):
            return super().submit_blocks(rows, slots, blocks, direction, on_done)
        base, stride = rows.data_ptr(), rows.stride(0)
        slot_addresses = [base + slot * stride for slot in slots]
        block_addresses = [block.data_ptr() for block in blocks]
        dsts, srcs = ((block_addresses, slot_addresses) if direction is Direction.LOAD
                      else (slot_addresses, block_addresses))
        owners = (rows, list(blocks))
        num_shares = max(1, min(self._num_workers, len(blocks) * nbytes // MIN_SHARE_BYTES))
        shares = cut_segments(dsts, srcs, nbytes, num_shares, WAITER_SHARE_WEIGHT)
        whole = (functools.partial(_copy_blocks_on_caller, rows, slots, list(blocks), direction, nbytes)
                 if nbytes >= WHOLE_MIN_BLOCK_BYTES else None)
        return self._queue_shares([functools.partial(_memmove_all, segments, owners) for segments in shares],
                                  direction, on_done, whole)

    def _queue_shares(self, shares: list[Callable[[], None]], direction: Direction,
                      on_done: DoneCallback, whole: Callable[[], None] | None = None) -> Transfer:
        """Queue one job's ``shares`` (each a worker's part); ``on_done`` runs after the last one. ``whole``:
        the same copies as one call, for a waiter that finds them all still queued."""
        transfer = _CpuTransfer(len(shares), on_done, self._run_queued_shares, whole)
        with self._lock:
            if self._closed:
                raise ClosedError("the transfer engine is closed")
            work = self._work[direction]
            for share in shares:
                work.append((share, transfer))
                self._tokens.put(True)
        return transfer

    def _serve(self) -> None:
        loads, stores = self._work
        while self._tokens.get() is not None:
            # Every token was put after its share, but a waiter may have run the share itself (``help``).
            try:
                task = loads.popleft()
            except IndexError:
                try:
                    task = stores.popleft()
                except IndexError:
                    continue
            _run(task)
            # Not kept while waiting for the next share: the views it holds keep a replaced arena mapped.
            del task

    def _run_queued_shares(self, transfer: _CpuTransfer) -> None:
        """Run on this thread what no worker started of ``transfer``.

        Where no worker has taken a share yet (usually: they wait for the GIL the waiter holds) and the waiter
        is the main thread, it takes them all and runs the job as one ``whole`` call, copied by torch's
        intra-op pool (its tokens then find nothing). Otherwise it runs one share, the last: the workers take
        the others from the front meanwhile, so the job is still copied by every thread; a caller taking them
        all copied alone while the woken workers found nothing to do.
        """
        # The main thread only: torch gives every thread that runs a parallel op a pool of its own, and many
        # waiting threads would each bring one onto the same cores.
        if (transfer.whole is not None and threading.current_thread() is threading.main_thread()
                and self._take_all(transfer)):
            error: BaseException | None = None
            try:
                transfer.whole()
            except Exception as exc:  # delivered to the job's owner, as a share's is
                error = exc
            for _ in range(transfer.num_shares):
                transfer.share_done(error)
            return
        for work in self._work:
            for task in [task for task in reversed(work) if task[1] is transfer][:1]:
                try:
                    work.remove(task)
                except ValueError:  # a worker took it meanwhile
                    return
                _run(task)
                return

    def _take_all(self, transfer: _CpuTransfer) -> bool:
        """Take every share of ``transfer`` out of the queue if all are still there; whether it did.

        A worker may pop one meanwhile (a deque's ``popleft`` and ``remove`` are each atomic): then the shares
        taken so far go back to the front, each with a new token (a worker may have spent theirs finding the
        queue empty meanwhile; a spare token finds nothing), where the workers and ``help`` find them as before.
        """
        work = next((work for work in self._work if any(task[1] is transfer for task in work)), None)
        if work is None:
            return False
        tasks = [task for task in work if task[1] is transfer]
        if len(tasks) != transfer.num_shares:
            return False
        taken: list[_Task] = []
        for task in tasks:
            try:
                work.remove(task)
            except ValueError:  # a worker took it meanwhile
                work.extendleft(reversed(taken))
                for _ in taken:
                    self._tokens.put(True)
                return False
            taken.append(task)
        return True

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:
                # Stop tokens come after every share's token, so queued work is finished first.
                self._tokens.put(None)
        for worker in self._workers:
            worker.join()
