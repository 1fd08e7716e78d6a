"""Host memory for restored caches, reused once the cache that held it let it go.

A restore on the CPU writes a buffer as large as the prefix. Fresh memory costs a page fault and the
kernel's zeroing per page before the copy can write it (measured here, 128 MiB: 2 GB/s into fresh memory
with huge pages, 0.25 GB/s where a VM touches the memory for the first time, 12 GB/s into memory used
before). A cache gives its restored tensors up at its first forward (the model concatenates the new
tokens into new tensors), so the next restore can write the same, already mapped memory.

Promises:
- ``take(nbytes)`` returns a uint8 tensor of exactly ``nbytes`` bytes over host memory (NumPy's
  allocation, which advises transparent huge pages), 64-byte aligned. Its contents are undefined.
- A buffer is handed out again only after every tensor over it was freed: the pool keeps the buffer and a
  weak reference to the view it handed out, which the tensor's storage holds until its last view dies.
- Idle buffers are kept up to ``max_idle_bytes`` (the most recently used first), the others are freed
  at the next ``take``; ``max_idle_bytes=0`` keeps none (every ``take`` allocates). A request is served
  by the smallest idle buffer that holds it and no more than twice its size, so a small restore does not
  tie up a large buffer.
- ``reused`` and ``allocated`` count the ``take`` calls served each way. Safe to call from several threads.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from kvtier.errors import InvalidInputError

# Idle buffers kept by default: the working size of a restore of tens of thousands of tokens of a small
# model; a larger restore allocates as before and the pool keeps the newest buffers up to this bound.
DEFAULT_MAX_IDLE_BYTES = 1 << 30
_ALIGN = 64


class RestoreBuffers:
    """A bounded pool of host buffers, each reused once nothing refers to the tensor handed out over it."""

    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        if max_idle_bytes < 0:
            raise InvalidInputError(f"max_idle_bytes must be >= 0, got {max_idle_bytes}")
        self.max_idle_bytes = max_idle_bytes
        self.reused = 0
        self.allocated = 0
        self._lock = threading.Lock()
        # Buffers, most recently handed out last: (buffer, offset of its aligned start, weak reference to
        # its view in use or None). The offset is kept: ``ndarray.ctypes`` builds an object per read.
        self._buffers: list[tuple[np.ndarray, int, weakref.ref[np.ndarray] | None]] = []
        # Bytes of every buffer, idle or not: while they fit ``max_idle_bytes`` there is nothing to trim.
        self._held_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of ``nbytes`` bytes, over idle reused memory where the pool has some."""
        if nbytes < 0:
            raise InvalidInputError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if self._held_bytes > self.max_idle_bytes:
                self._trim()
            chosen, chosen_size = -1, 0
            for i, (buffer, _, in_use) in enumerate(self._buffers):
                size = buffer.size
                if ((in_use is None or in_use() is None) and nbytes <= size - _ALIGN <= 2 * nbytes + _ALIGN
                        and (chosen < 0 or size < chosen_size)):
                    chosen, chosen_size = i, size
            if chosen >= 0:
                buffer, start, _ = self._buffers.pop(chosen)
                self.reused += 1
            else:
                buffer = np.empty(nbytes + _ALIGN, dtype=np.uint8)
                start = -buffer.ctypes.data % _ALIGN
                self._held_bytes += buffer.size
                self.allocated += 1
            view = buffer[start:start + nbytes]
            self._buffers.append((buffer, start, weakref.ref(view)))
        return torch.from_numpy(view)

    def idle_bytes(self) -> int:
        """Bytes of the buffers nothing refers to now."""
        with self._lock:
            return sum(buffer.size for buffer, _, in_use in self._buffers if in_use is None or in_use() is None)

    def _trim(self) -> None:
        """Free the idle buffers beyond ``max_idle_bytes``, the least recently used first."""
        kept = 0
        survivors: list[tuple[np.ndarray, int, weakref.ref[np.ndarray] | None]] = []
        for buffer, start, in_use in reversed(self._buffers):
            if in_use is not None and in_use() is not None:
                survivors.append((buffer, start, in_use))
            elif kept + buffer.size <= self.max_idle_bytes:
                kept += buffer.size
                survivors.append((buffer, start, None))
            else:
                self._held_bytes -= buffer.size
        self._buffers = survivors[::-1]
