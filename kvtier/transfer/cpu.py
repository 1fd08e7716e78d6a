"""The CPU transfer backend: worker threads copy with ``torch.Tensor.copy_``.

Promises (beyond ``kvtier.transfer.base``): loads queued behind stores jump ahead of them; a job's pairs are
copied in order by one worker; an exception inside a copy is delivered to ``on_done``, never lost.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Sequence

import torch

from kvtier.errors import ClosedError
from kvtier.transfer.base import CopyPair, Direction, DoneCallback, Transfer, TransferEngine, check_pairs


class _CpuTransfer(Transfer):
    def __init__(self) -> None:
        self._finished = threading.Event()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)


_Task = tuple[int, int, Sequence[CopyPair] | None, DoneCallback | None, _CpuTransfer | None]


class CpuTransferEngine(TransferEngine):
    name = "cpu"

    def __init__(self, num_workers: int = 2) -> None:
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
        transfer = _CpuTransfer()
        with self._lock:
            if self._closed:
                raise ClosedError("the transfer engine is closed")
            self._queue.put((int(direction), next(self._sequence), pairs, on_done, transfer))
        return transfer

    def _serve(self) -> None:
        while True:
            _, _, pairs, on_done, transfer = self._queue.get()
            if pairs is None or on_done is None or transfer is None:
                return
            error: BaseException | None = None
            try:
                with torch.no_grad():
                    for dst, src in pairs:
                        dst.copy_(src)
            except Exception as exc:  # delivered to the job's owner, who turns it into failed blocks
                error = exc
            try:
                on_done(error)
            finally:
                transfer._finished.set()

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:
                # Sentinels sort after every queued job, so queued work is finished first.
                self._queue.put((len(Direction), next(self._sequence), None, None, None))
        for worker in self._workers:
            worker.join()
