"""Raw copy baselines: what the machine does without kvtier, with one thread and with as many as the store.

Promises:
- ``RawCopier(threads).copy(dsts, srcs)`` copies each ``srcs[i]`` into ``dsts[i]`` (contiguous CPU tensors of
  equal byte size) and returns when every byte arrived. The bytes, not the tensors, are cut into
  ``threads`` page-aligned parts: the caller copies the first, ``threads - 1`` persistent threads the others
  (one hand-off each, no queue of jobs, no bookkeeping): the best a copy with that many threads does here.
  With one thread it is a plain ``memmove`` on the caller's thread.
- Every copy is a ``memmove`` through ctypes, which releases the GIL, as the store's CPU transfer engine does.
- ``TorchCopier(threads)`` is the other way the machine copies with that many threads: ``Tensor.copy_`` on
  the caller's thread, split by torch's own intra-op pool (set to ``threads`` while the copier is open). Its
  team hands work over without a Python thread's wake-up: on 8 MiB copies into memory not recently written,
  it beat the memmove threads by 15-30% here, so a benchmark's best raw copy is the better of both.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Sequence

import torch

from kvtier.transfer.cpu import cut_segments

_Segments = list[tuple[int, int, int]]


def _copy(segments: _Segments) -> None:
    memmove = ctypes.memmove
    for dst, src, nbytes in segments:
        memmove(dst, src, nbytes)


class RawCopier:
    """See the module docstring. Use as a context manager (its threads stop on exit)."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._work: queue.SimpleQueue[tuple[_Segments, threading.Event] | None] = queue.SimpleQueue()
        self._helpers = [threading.Thread(target=self._serve, name=f"raw-copy-{i}", daemon=True)
                         for i in range(self.threads - 1)]
        for helper in self._helpers:
            helper.start()

    def copy(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
        nbytes = srcs[0].nbytes
        shares = cut_segments([t.data_ptr() for t in dsts], [t.data_ptr() for t in srcs], nbytes, self.threads)
        events = []
        for share in shares[1:]:
            done = threading.Event()
            self._work.put((share, done))
            events.append(done)
        _copy(shares[0])
        for done in events:
            done.wait()

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            segments, done = item
            _copy(segments)
            done.set()

    def close(self) -> None:
        for _ in self._helpers:
            self._work.put(None)
        for helper in self._helpers:
            helper.join()

    def __enter__(self) -> RawCopier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TorchCopier:
    """See the module docstring. Use as a context manager: torch's thread count is restored on exit."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)

    def copy(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
        for dst, src in zip(dsts, srcs, strict=True):
            dst.view(-1).view(torch.uint8).copy_(src.view(-1).view(torch.uint8))

    def close(self) -> None:
        torch.set_num_threads(self._previous)

    def __enter__(self) -> TorchCopier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
