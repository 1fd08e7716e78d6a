"""The host arena: one shared-memory mapping cut into fixed-size, 4 KiB-aligned slots.

Promises:
- The arena is one shared mapping; every slot is a view of it. A named arena is a POSIX shared-memory object
  (a file under ``/dev/shm``), so another process that attaches by name sees the same bytes with no copy;
  an unnamed one is anonymous shared memory, which ``/dev/shm``'s size limit does not bound.
- A named arena's pages are all allocated when it is created (``posix_fallocate``): a pool larger than the
  free ``/dev/shm`` is a ``ConfigError`` that says what to do, never a SIGBUS at a later page fault.
- Slots start on 4 KiB boundaries and are a whole number of 4 KiB pages long, so direct (O_DIRECT) disk
  I/O can read and write them in place.
- ``close`` never unmaps memory a view still uses: the mapping goes with the last view taken from it.
- An arena created without a name has no file: its memory lives exactly as long as the mapping, and a
  crash leaks nothing. A named arena is unlinked by ``close(unlink=True)`` of its creator.
- ``prepare`` starts one background thread that readies the arena in slot-aligned chunks. Where CUDA is
  present and pinning is asked for, it registers the chunks as page-locked memory in ascending order
  (registration faults the pages in too); no slot straddles two registrations. Otherwise it prefaults the
  chunks (``madvise(MADV_POPULATE_WRITE)``: pages allocated and mapped without a byte changed, so a fill
  racing it is never overwritten) from the last chunk down, away from the low slots a fresh host tier
  hands out first. Opening stays fast, and a pool filled after its prefault finished does not pay a page
  fault per 4 KiB (on a VM where a fault is a hypervisor exit, that is 5-10x). ``prefaulted_bytes`` and
  ``pinned_bytes`` say how far it got; a kernel without ``MADV_POPULATE_WRITE`` (before Linux 5.14) only
  skips the prefault. Without CUDA nothing is pinned and everything else works the same.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kvtier.errors import ClosedError, ConfigError

PAGE_BYTES = 4096
_SHM_DIR = Path("/dev/shm")
# linux/mman.h: populate page tables as write faults would, without writing (Linux 5.14+).
_MADV_POPULATE_WRITE = 23
_PREFAULT_STEP_BYTES = 16 * 1024 * 1024
log = logging.getLogger(__name__)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class HostArena:
    """``num_slots`` slots of ``slot_bytes`` each in one shared-memory mapping."""

    def __init__(self, num_slots: int, slot_bytes: int, *, name: str | None = None, create: bool = True) -> None:
        if num_slots <= 0:
            raise ConfigError(f"an arena needs at least one slot, got {num_slots}")
        if slot_bytes <= 0 or slot_bytes % PAGE_BYTES:
            raise ConfigError(f"slot_bytes must be a positive multiple of {PAGE_BYTES}, got {slot_bytes}")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.total_bytes = num_slots * slot_bytes
        self.name = name or f"kvtier-{os.getpid()}-{secrets.token_hex(4)}"
        self._owner = create
        self._closed = False
        self._pinned_bytes = 0
        self._prefaulted_bytes = 0
        self._registered: list[int] = []
        self._stop_pinning = threading.Event()
        self._pin_thread: threading.Thread | None = None
        if create and name is None:
            # Nobody attaches to an unnamed arena: anonymous shared memory, outside /dev/shm and its size limit.
            self._mmap = mmap.mmap(-1, self.total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self._mmap = _map_shm(_SHM_DIR / self.name, self.total_bytes, create)
        # Through NumPy, every view holds an export of the mapping: ``close`` then leaves it mapped until the
        # last view is gone (``torch.frombuffer`` holds none, and a view used after close would fault).
        self.tensor = torch.from_numpy(np.frombuffer(self._mmap, dtype=np.uint8))

    def slot(self, index: int, nbytes: int | None = None) -> torch.Tensor:
        """A uint8 view of the first ``nbytes`` (default all ``slot_bytes``) of slot ``index``."""
        if self._closed:
            raise ClosedError("the host arena is closed")
        return self.tensor.narrow(0, index * self.slot_bytes, self.slot_bytes if nbytes is None else nbytes)

    def rows(self) -> torch.Tensor:
        """The whole arena as a ``(num_slots, slot_bytes)`` uint8 view (no copy): row ``i`` is slot ``i``."""
        if self._closed:
            raise ClosedError("the host arena is closed")
        return self.tensor.view(self.num_slots, self.slot_bytes)

    def start_pinning(self, chunk_bytes: int) -> None:
        """Register the arena with CUDA as page-locked memory, chunk by chunk, in the background."""
        self.prepare(chunk_bytes, prefault=False, pin=True)

    def prepare(self, chunk_bytes: int, *, prefault: bool = True, pin: bool = True) -> None:
        """Prefault and/or pin (where CUDA is present) the arena chunk by chunk in one background thread.

        Called once per arena; a second call does nothing.
        """
        pin = pin and torch.cuda.is_available()
        if not (prefault or pin) or self._pin_thread is not None:
            return
        chunk_bytes = max(self.slot_bytes, chunk_bytes // self.slot_bytes * self.slot_bytes)
        self._pin_thread = threading.Thread(target=self._prepare_chunks, args=(chunk_bytes, prefault, pin),
                                            daemon=True, name="kvtier-pin")
        self._pin_thread.start()

    def _prepare_chunks(self, chunk_bytes: int, prefault: bool, pin: bool) -> None:
        base = self.tensor.data_ptr()
        if not pin:
            # Small prefault steps: ``close`` waits for the step under way (a fault can cost a microsecond
            # per 4 KiB page on a VM).
            chunk_bytes = max(self.slot_bytes, _PREFAULT_STEP_BYTES // self.slot_bytes * self.slot_bytes)
        offsets = list(range(0, self.total_bytes, chunk_bytes))
        madvise = None if pin or not prefault else _libc_madvise()
        for offset in offsets if pin else reversed(offsets):
            if self._stop_pinning.is_set():
                return
            length = min(chunk_bytes, self.total_bytes - offset)
            if pin:
                if not self._register(base + offset, length):
                    return
                self._prefaulted_bytes += length
            elif madvise is None:
                return
            # ctypes drops the GIL for the call: fills on other threads go on meanwhile.
            elif madvise(base + offset, length, _MADV_POPULATE_WRITE) != 0:
                log.info("prefault unavailable (errno %s): pages fault in on first touch", ctypes.get_errno())
                return
            else:
                self._prefaulted_bytes += length

    def _register(self, pointer: int, length: int) -> bool:
        status = torch.cuda.cudart().cudaHostRegister(pointer, length, 0)
        if int(status) != 0:
            log.warning("cudaHostRegister failed (%s) at offset %d: the rest stays pageable", status,
                        pointer - self.tensor.data_ptr())
            return False
        self._registered.append(pointer)
        self._pinned_bytes += length
        return True

    @property
    def prefaulted_bytes(self) -> int:
        return self._prefaulted_bytes

    @property
    def pinned_bytes(self) -> int:
        return self._pinned_bytes

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for ``prepare``'s thread; True if it prefaulted or pinned everything."""
        if self._pin_thread is not None:
            self._pin_thread.join(timeout)
        return self._prefaulted_bytes == self.total_bytes

    def wait_pinned(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for ``prepare``'s thread; True if the whole arena is pinned."""
        self.wait_prepared(timeout)
        return self._pinned_bytes == self.total_bytes

    def close(self, unlink: bool = False) -> None:
        """Unmap the arena (views taken from it must no longer be used). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_pinning.set()
        if self._pin_thread is not None:
            self._pin_thread.join()
            if self._registered:
                cudart = torch.cuda.cudart()
                for pointer in self._registered:
                    cudart.cudaHostUnregister(pointer)
        del self.tensor
        try:
            self._mmap.close()
        except BufferError:
            # A view still exported elsewhere keeps the mapping alive until it is collected.
            log.debug("arena %s still has views; the mapping is released with them", self.name)
        if unlink and self._owner:
            (_SHM_DIR / self.name).unlink(missing_ok=True)


def _map_shm(path: Path, total_bytes: int, create: bool) -> mmap.mmap:
    """Map the shared-memory file ``path``; a created one gets all of its pages at once (or ``ConfigError``)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot {'create' if create else 'attach'} shared memory {path}: {exc}") from exc
    try:
        if create:
            os.ftruncate(fd, total_bytes)
            _allocate(fd, path, total_bytes)
        elif os.fstat(fd).st_size < total_bytes:
            raise ConfigError(f"shared memory {path} is smaller than {total_bytes} bytes")
        return mmap.mmap(fd, total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        if create:
            path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _allocate(fd: int, path: Path, total_bytes: int) -> None:
    """Allocate every page of the file now: a tmpfs that is too small fails here, not with SIGBUS at a fault."""
    try:
        os.posix_fallocate(fd, 0, total_bytes)
    except OSError as exc:
        stat = os.statvfs(path.parent)
        free = stat.f_bavail * stat.f_frsize
        raise ConfigError(
            f"a host pool of {total_bytes / 2**20:.0f} MiB does not fit in {path.parent} ({free / 2**20:.0f} MiB "
            f"free: {exc.strerror}): give a smaller pool (--pool, daemon.pool_bytes or host.capacity_bytes) or "
            f"enlarge {path.parent} (in a container: docker run --shm-size=...)") from exc


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise
