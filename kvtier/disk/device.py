"""Block devices under the disk tier: a preallocated data file, and a memory device for tests.

Modelled on CacheLib Navy's ``Device``: the base class checks bounds and alignment, then calls a replaceable
implementation, so tests can swap in a device that corrupts bytes, truncates itself or fails reads/writes.

Promises:
- ``read(offset, buffers)`` fills ``buffers`` in order from ``offset`` and returns the bytes read, fewer
  only at the end of the data (a truncated file); OS errors propagate as ``OSError``.
- ``write(offset, buffer)`` writes all of ``buffer`` or raises ``OSError`` (ENOSPC, EIO, ...).
- On a direct (O_DIRECT) device every offset and buffer length is a multiple of ``PAGE_BYTES``
  (``InvalidInputError`` otherwise); buffers must also start page-aligned, which the callers guarantee by
  using ``aligned_buffer`` / ``aligned_tensor`` memory or host arena slots.
- ``FileDevice`` opens with O_DIRECT only when asked; ``supports_direct_io(directory)`` says whether the
  filesystem takes O_DIRECT I/O (tmpfs on older kernels, some FUSE and network filesystems do not).
- Reads and writes copy nothing: I/O goes straight between the file and the caller's memory.
  ``copy_bytes`` is the one payload copy the tier makes (caller tensor -> region buffer, on offer).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from kvtier.disk.format import PAGE_BYTES
from kvtier.errors import InvalidInputError


def aligned_buffer(nbytes: int, populate: bool = False) -> mmap.mmap:
    """Zeroed anonymous memory of ``nbytes``, page-aligned (usable for O_DIRECT I/O).

    ``populate`` faults every page in now (MAP_POPULATE), so the first fill runs at memcpy speed.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(-1, nbytes, flags=flags)


def aligned_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose data starts on a 4096-byte boundary."""
    base = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8)
    start = -base.data_ptr() % PAGE_BYTES
    return base[start : start + nbytes]


def copy_bytes(dst: npt.NDArray[np.uint8], offset: int, src: memoryview) -> None:
    """Copy ``src`` into ``dst`` at ``offset`` with one memmove, without holding the GIL.

    Measured here on 2 MiB blocks: 5.5 GB/s, against 3.4 GB/s for a numpy slice assignment and 0.8 GB/s for
    ``torch.Tensor.copy_`` (whose intra-op threads fight over two cores).
    """
    if offset < 0 or offset + len(src) > len(dst):
        raise InvalidInputError(f"{len(src)} bytes at {offset} do not fit in {len(dst)} bytes")
    ctypes.memmove(dst.ctypes.data + offset, np.frombuffer(src, dtype=np.uint8).ctypes.data, len(src))


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous uint8 CPU tensor's memory (no copy)."""
    return tensor.view(-1).numpy().data.cast("B")


def supports_direct_io(directory: str) -> bool:
    """Whether files in ``directory`` accept an aligned O_DIRECT write and read."""
    if not hasattr(os, "O_DIRECT"):
        return False
    page = aligned_buffer(PAGE_BYTES)
    fd, probe = tempfile.mkstemp(prefix=".kvtier-odirect-", dir=directory)
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
        try:
            return os.pwritev(fd, [page], 0) == PAGE_BYTES and os.preadv(fd, [page], 0) == PAGE_BYTES
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        page.close()
        os.unlink(probe)


class Device(ABC):
    """``size`` bytes addressed by offset; see the module docstring for the contract."""

    def __init__(self, size: int, direct_io: bool) -> None:
        self.size = size
        self.direct_io = direct_io

    def read(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self._check(offset, buffers)
        return self._preadv(offset, list(buffers))

    def write(self, offset: int, buffer: memoryview) -> None:
        self._check(offset, [buffer])
        written = self._pwritev(offset, buffer)
        if written != len(buffer):
            raise OSError(errno.EIO, f"short write: {written} of {len(buffer)} bytes at offset {offset}")

    def _check(self, offset: int, buffers: Sequence[memoryview]) -> None:
        length = sum(len(buffer) for buffer in buffers)
        if offset < 0 or offset + length > self.size:
            raise InvalidInputError(f"I/O of {length} bytes at {offset} is outside a device of {self.size} bytes")
        if self.direct_io and (offset % PAGE_BYTES or any(len(buffer) % PAGE_BYTES for buffer in buffers)):
            raise InvalidInputError(f"direct I/O needs {PAGE_BYTES}-aligned offsets and lengths")

    @abstractmethod
    def _preadv(self, offset: int, buffers: list[memoryview]) -> int: ...

    @abstractmethod
    def _pwritev(self, offset: int, buffer: memoryview) -> int: ...

    @abstractmethod
    def sync(self) -> None:
        """Make every completed write durable (fdatasync)."""

    @abstractmethod
    def close(self) -> None: ...


def _drain(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The part of ``buffers`` left after the first ``done`` bytes (after a short preadv)."""
    while buffers and done >= len(buffers[0]):
        done -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and done:
        buffers = [buffers[0][done:], *buffers[1:]]
    return buffers


class FileDevice(Device):
    """A data file preallocated to ``size`` bytes (fallocate), opened with O_DIRECT when ``direct_io``."""

    def __init__(self, path: str, size: int, direct_io: bool) -> None:
        super().__init__(size, direct_io)
        flags = os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct_io else 0)
        self.path = path
        self._fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(self._fd).st_size < size:
                os.posix_fallocate(self._fd, 0, size)
        except OSError:
            os.close(self._fd)
            raise

    def _preadv(self, offset: int, buffers: list[memoryview]) -> int:
        total = 0
        while buffers:
            done = os.preadv(self._fd, buffers, offset + total)
            if done == 0:
                break
            total += done
            buffers = _drain(buffers, done)
        return total

    def _pwritev(self, offset: int, buffer: memoryview) -> int:
        total = 0
        while total < len(buffer):
            done = os.pwritev(self._fd, [buffer[total:]], offset + total)
            if done == 0:
                break
            total += done
        return total

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MemoryDevice(Device):
    """A device in RAM for tests: can flip bytes, truncate itself and fail reads or writes with an errno."""

    def __init__(self, size: int, direct_io: bool = True) -> None:
        super().__init__(size, direct_io)
        self.data = bytearray(size)
        self.readable_bytes = size
        self.write_errno: int | None = None
        self.read_errno: int | None = None
        self.writes = 0

    def corrupt(self, offset: int) -> None:
        """Flip every bit of the byte at ``offset``."""
        self.data[offset] ^= 0xFF

    def truncate(self, nbytes: int) -> None:
        """Behave like a file cut to ``nbytes``: reads past it come back short."""
        self.readable_bytes = nbytes

    def _preadv(self, offset: int, buffers: list[memoryview]) -> int:
        if self.read_errno is not None:
            raise OSError(self.read_errno, os.strerror(self.read_errno))
        total = 0
        for buffer in buffers:
            take = max(0, min(len(buffer), self.readable_bytes - offset - total))
            buffer[:take] = self.data[offset + total : offset + total + take]
            total += take
            if take < len(buffer):
                break
        return total

    def _pwritev(self, offset: int, buffer: memoryview) -> int:
        if self.write_errno is not None:
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        self.data[offset : offset + len(buffer)] = buffer
        self.writes += 1
        return len(buffer)

    def sync(self) -> None:
        if self.write_errno is not None:
            raise OSError(self.write_errno, os.strerror(self.write_errno))

    def close(self) -> None:
        """Keep the bytes: a test may reopen a tier over the same device to model a restart."""
