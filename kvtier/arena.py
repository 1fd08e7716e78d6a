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
- A named arena's creator holds a shared ``flock`` on its file from the moment it creates it until
  ``close``; the kernel drops it when the process dies however it dies. ``remove_if_abandoned`` unlinks a
  file only when nobody holds that lock and the file is older than ``ABANDONED_AFTER_S``: a live arena is
  never removed, whichever PID namespace (container) its creator runs in, where a process id says nothing.
- ``prepare`` starts one background thread that prefaults the arena (``madvise(MADV_POPULATE_WRITE)``:
  pages allocated and mapped without a byte changed, so a fill racing it is never overwritten) in
  slot-aligned steps from the last chunk down, away from the low slots a fresh host tier hands out first.
  Opening stays fast, and a pool filled after its prefault finished does not pay a page fault per 4 KiB
  (on a VM where a fault is a hypervisor exit, that is 5-10x). A kernel without ``MADV_POPULATE_WRITE``
  (before Linux 5.14) only skips the prefault.
- ``start_pinning(chunk_bytes, device)`` registers the arena with CUDA as page-locked, mapped, portable
  memory in ascending slot-aligned chunks, from a background thread **with ``device`` current** (default:
  the caller's current device): the only CUDA context it touches is the one of the GPU that copies, never
  GPU 0 by default. Only processes that copy to a GPU call it (a daemon that never does never makes a
  CUDA context). The first call registers; one registration serves every device of the process (it is
  portable), and each later device is recorded. ``pinned_bytes`` and ``prefaulted_bytes`` say how far
  each thread got. Without CUDA nothing is pinned and everything else works the same.
- ``close`` stops both threads and, before unregistering and unmapping, synchronises every device the
  arena was pinned for: a kernel still reading or writing mapped slots finishes first.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kvtier.errors import ClosedError, ConfigError

PAGE_BYTES = 4096
_SHM_DIR = Path("/dev/shm")
# A file younger than this is never taken for abandoned: its creator may not hold its lock yet (it takes it
# right after creating the file, microseconds later).
ABANDONED_AFTER_S = 10.0
# linux/mman.h: populate page tables as write faults would, without writing (Linux 5.14+).
_MADV_POPULATE_WRITE = 23
_PREFAULT_STEP_BYTES = 16 * 1024 * 1024
# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every CUDA context of the process, and
# mapped at the same address on every device (UVA), whichever device registered it.
_HOST_REGISTER_FLAGS = 0x01 | 0x02
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
        self._pin_lock = threading.Lock()
        self._pin_devices: set[int] = set()
        self._pin_thread: threading.Thread | None = None
        self._prefault_thread: threading.Thread | None = None
        # The creator's open file of a named arena, holding its lock (see the module docstring).
        self._lock_fd: int | None = None
        if create and name is None:
            # Nobody attaches to an unnamed arena: anonymous shared memory, outside /dev/shm and its size limit.
            self._mmap = mmap.mmap(-1, self.total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self._mmap, self._lock_fd = _map_shm(_SHM_DIR / self.name, self.total_bytes, create)
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

    def start_pinning(self, chunk_bytes: int, device: torch.device | None = None) -> None:
        """Register the arena with CUDA, chunk by chunk, in the background, with ``device`` current (see above).

        ``device`` defaults to the caller's current CUDA device. Idempotent per device; no-op without CUDA.
        """
        if not torch.cuda.is_available() or self._closed:
            return
        index = torch.cuda.current_device() if device is None or device.index is None else device.index
        with self._pin_lock:
            self._pin_devices.add(index)
            if self._pin_thread is not None:
                return
            chunk_bytes = max(self.slot_bytes, chunk_bytes // self.slot_bytes * self.slot_bytes)
            self._pin_thread = threading.Thread(target=self._pin_chunks, args=(chunk_bytes, index), daemon=True,
                                                name="kvtier-pin")
            self._pin_thread.start()

    def prepare(self, *, prefault: bool = True) -> None:
        """Prefault the arena in one background thread (see above). Called once per arena; later calls do nothing."""
        if not prefault or self._prefault_thread is not None:
            return
        self._prefault_thread = threading.Thread(target=self._prefault_chunks, daemon=True, name="kvtier-prefault")
        self._prefault_thread.start()

    def _prefault_chunks(self) -> None:
        base = self.tensor.data_ptr()
        # Small steps: ``close`` waits for the step under way (a fault can cost a microsecond per 4 KiB
        # page on a VM).
        step = max(self.slot_bytes, _PREFAULT_STEP_BYTES // self.slot_bytes * self.slot_bytes)
        madvise = _libc_madvise()
        for offset in reversed(range(0, self.total_bytes, step)):
            if self._stop_pinning.is_set() or madvise is None:
                return
            length = min(step, self.total_bytes - offset)
            # ctypes drops the GIL for the call: fills on other threads go on meanwhile.
            if madvise(base + offset, length, _MADV_POPULATE_WRITE) != 0:
                log.info("prefault unavailable (errno %s): pages fault in on first touch", ctypes.get_errno())
                return
            self._prefaulted_bytes += length

    def _pin_chunks(self, chunk_bytes: int, index: int) -> None:
        # The CUDA runtime's current device is per thread: without this a new thread registers on GPU 0.
        torch.cuda.set_device(index)
        base = self.tensor.data_ptr()
        for offset in range(0, self.total_bytes, chunk_bytes):
            if self._stop_pinning.is_set() or not self._register(base + offset, min(chunk_bytes,
                                                                                      self.total_bytes - offset)):
                return

    def _register(self, pointer: int, length: int) -> bool:
        status = torch.cuda.cudart().cudaHostRegister(pointer, length, _HOST_REGISTER_FLAGS)
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

    @property
    def pinned_devices(self) -> frozenset[int]:
        """The CUDA device indices the arena was pinned for (``close`` synchronises them)."""
        with self._pin_lock:
            return frozenset(self._pin_devices)

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for ``prepare``'s thread; True if it prefaulted everything."""
        if self._prefault_thread is not None:
            self._prefault_thread.join(timeout)
        return self._prefaulted_bytes == self.total_bytes

    def wait_pinned(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the pinning thread; True if the whole arena is pinned."""
        if self._pin_thread is not None:
            self._pin_thread.join(timeout)
        return self._pinned_bytes == self.total_bytes

    def close(self, unlink: bool = False) -> None:
        """Unmap the arena (views taken from it must no longer be used). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_pinning.set()
        for thread in (self._prefault_thread, self._pin_thread):
            if thread is not None:
                thread.join()
        if self._registered:
            devices = sorted(self.pinned_devices)
            # Kernels and copies queued on any stream of these devices may still use mapped slots.
            for index in devices:
                torch.cuda.synchronize(index)
            with torch.cuda.device(devices[0]):
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # after the unlink: a cleaner never sees the file unlocked before it goes
            self._lock_fd = None


def _map_shm(path: Path, total_bytes: int, create: bool) -> tuple[mmap.mmap, int | None]:
    """Map the shared-memory file ``path``; a created one gets all of its pages at once (or ``ConfigError``)
    and is returned with its open descriptor, which holds the creator's lock (closed: the lock goes)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot {'create' if create else 'attach'} shared memory {path}: {exc}") from exc
    try:
        if create:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, total_bytes)
            _allocate(fd, path, total_bytes)
        elif os.fstat(fd).st_size < total_bytes:
            raise ConfigError(f"shared memory {path} is smaller than {total_bytes} bytes")
        mapping = mmap.mmap(fd, total_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        if create:
            path.unlink(missing_ok=True)
        os.close(fd)
        raise
    if create:
        return mapping, fd
    os.close(fd)
    return mapping, None


def remove_if_abandoned(path: Path, min_age_s: float = ABANDONED_AFTER_S) -> bool:
    """Unlink the named arena file ``path`` if its creator is gone (nobody holds its lock) and it is older
    than ``min_age_s``; whether it was removed. A file that cannot be opened or locked is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if time.time() - os.fstat(fd).st_ctime < min_age_s:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its creator is alive, in this PID namespace or another
            return False
        path.unlink(missing_ok=True)
        return True
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
