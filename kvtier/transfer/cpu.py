"""The CPU transfer backend: worker threads copy, each job split across the workers.

Promises (beyond ``kvtier.transfer.base``): loads queued behind stores jump ahead of them; a job's pairs are
cut into one contiguous share per worker and copied in parallel, and its ``on_done`` runs once, after the
last share, with the first exception any share raised (never lost). Plain CPU-to-CPU copies of equal
layout are a ``memmove`` through NumPy, which releases the GIL: torch's ``copy_`` called from a thread
other than the main one ran at about 60% of its main-thread speed here (its intra-op pool is the main
thread's). Anything else (other devices, dtypes or strides) goes through ``Tensor.copy_``.
``submit_blocks`` between CPU tensors and arena rows copies raw addresses with ``memmove`` (ctypes, GIL
released): about a microsecond of Python per block instead of ten; the job holds the tensors until done.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import queue
import threading
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
    def __init__(self, num_shares: int, on_done: DoneCallback) -> None:
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._shares_left = num_shares
        self._error: BaseException | None = None
        self._on_done = on_done

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


_Task = tuple[int, int, Callable[[], None] | None, _CpuTransfer | None]


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


def _memmove_all(dsts: Sequence[int], srcs: Sequence[int], nbytes: int, owners: object) -> None:
    """``memmove`` each address pair; ``owners`` keeps the memory alive until the copies are done."""
    memmove = ctypes.memmove
    for dst, src in zip(dsts, srcs, strict=True):
        memmove(dst, src, nbytes)


class CpuTransferEngine(TransferEngine):
    name = "cpu"

    def __init__(self, num_workers: int = 2) -> None:
        self._num_workers = num_workers
        self._queue: queue.PriorityQueue[_Task] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._serve, name=f"kvtier-copy-{i}", daemon=True) for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        check_pairs(pairs)
        return self._queue_shares(len(pairs), lambda start, stop: functools.partial(_copy_pairs, pairs[start:stop]),
                                  direction, on_done)

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback) -> Transfer:
        nbytes = check_blocks(rows, slots, blocks)
        if rows.device.type != "cpu" or any(block.device.type != "cpu" for block in blocks):
            return super().submit_blocks(rows, slots, blocks, direction, on_done)
        base, stride = rows.data_ptr(), rows.stride(0)
        slot_addresses = [base + slot * stride for slot in slots]
        block_addresses = [block.data_ptr() for block in blocks]
        dsts, srcs = ((block_addresses, slot_addresses) if direction is Direction.LOAD
                      else (slot_addresses, block_addresses))
        owners = (rows, list(blocks))
        return self._queue_shares(
            len(blocks), lambda start, stop: functools.partial(_memmove_all, dsts[start:stop], srcs[start:stop],
                                                               nbytes, owners), direction, on_done)

    def _queue_shares(self, num_items: int, share: Callable[[int, int], Callable[[], None]], direction: Direction,
                      on_done: DoneCallback) -> Transfer:
        """Cut ``num_items`` into one contiguous share per worker; ``share(start, stop)`` is a share's work."""
        num_shares = max(1, min(self._num_workers, num_items))
        bounds = [num_items * i // num_shares for i in range(num_shares + 1)]
        transfer = _CpuTransfer(num_shares, on_done)
        with self._lock:
            if self._closed:
                raise ClosedError("the transfer engine is closed")
            for start, stop in itertools.pairwise(bounds):
                self._queue.put((int(direction), next(self._sequence), share(start, stop), transfer))
        return transfer

    def _serve(self) -> None:
        while True:
            _, _, work, transfer = self._queue.get()
            if work is None or transfer is None:
                return
            error: BaseException | None = None
            try:
                work()
            except Exception as exc:  # delivered to the job's owner, who turns it into failed blocks
                error = exc
            transfer.share_done(error)
            # Not kept while waiting for the next job: the views it holds keep a replaced arena mapped.
            del work, transfer

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:
                # Sentinels sort after every queued job, so queued work is finished first.
                self._queue.put((len(Direction), next(self._sequence), None, None))
        for worker in self._workers:
            worker.join()
