"""The disk tier: a log of fixed regions over one or more data files, with a persistent LMDB index.

Modelled on CacheLib Navy's BlockCache. Each data path holds one preallocated file cut into regions of
``region_bytes``, or smaller ones on a tier that would have fewer than ``min_regions`` regions
(``DiskConfig.scaled_region_bytes``: a region is the unit of eviction, and evicting a large share of a small
tier at once costs hits). A directory keeps the region size it was written with while that is at most
``region_bytes`` and fits the capacity (a default capacity that follows the drive's free space, or a raised
one, changes the scaled size; the blocks stay readable); region ``r`` lives in path
``r % len(paths)`` (striping). Offered blocks are appended to
an in-memory region buffer. The region is marked OPEN in the index when it opens; while it fills, each
``_STREAM_BYTES`` appended are written behind the appends (in order, on the writer threads), so the drive
works during the fill instead of after it (with the first region written only once full, a burst ran at
0.75-0.85x of raw O_DIRECT); a full region is sealed, its last bytes written (on the writer threads too),
and then, on a sealer thread of its own, fdatasync'ed, and only then are its entries committed together with
its SEALED mark (index changes are group-committed: about one synced LMDB transaction per region). The
writer threads never wait for a sync or a commit, so the next region's parts keep the drive busy meanwhile.
Space comes back by evicting whole regions, oldest sealed first (FIFO); a block read at least
``reinsert_hits`` times since it was written is read back and copied into the new open region instead of
dropped (on the I/O pool when a demotion needs the region: see ``offer``), unless ``held_above(key)`` says
host RAM holds it (the host's eviction offers it again: host and disk mostly hold different blocks). While
the admission policy says ``exclusive``, ``moved_to_host(key)`` (the store calls it once host RAM committed
a copy read from here) drops the disk's copy, so host and disk hold different blocks from the hit on. A
sealed region left without a live block by any removal is free space at once (its slot goes back to the
clean pool); otherwise a removed block's space comes back when its region is evicted.
``on_forget(keys)`` hears of every key the tier stops holding (the store's removal log).

The region buffers are the write-back buffer (``disk.writeback_buffer_bytes``, at least 3 regions; 3 are
faulted in at open, the others allocated by the first burst that needs them and kept). One fills while the
others wait for the drive, so a burst of demotions up to the buffer's size is written at the drive's pace
instead of dropped. Why a staging area and not host slots held until written: the host tier's slots belong
to the engine's working set, and holding them would turn a slow drive into failed puts; a staging copy
costs one memcpy per demoted block (about 5 GB/s here), which the offer already paid.

Promises:
- ``offer`` copies the payload before it returns; a block it admits is readable at once (from memory until
  its region is written) and survives a restart once its region is written (``flush`` waits for that).
- ``offer(wait=False)`` never waits for the drive and never reads it (the store demotes this way, holding its
  lock): where room means evicting a region with hot blocks to re-read, that region is opened on the I/O
  pool and the block is refused meanwhile, as it is where room means evicting a region a read in flight
  still reads. A block it cannot take is counted by cause: ``busy_rejected`` (the write-back buffer is full,
  the next region is being opened, or the region to evict is being read), ``budget_rejected`` (over the write
  budget), ``admissions_rejected`` (the admission policy said no).
- ``read_into`` returns ``True`` only with bytes whose header and payload checksums verified. A corrupt,
  truncated or torn entry is a miss, counted (``checksum_failures``) and dropped; a read error is a miss
  counted in ``io_errors``; neither raises. After ``False`` the contents of ``dst`` are undefined.
- After a crash (even SIGKILL mid-write) a reopen serves exactly the blocks of sealed regions; regions
  caught open or being written are discarded (``torn_regions_discarded`` counts those the index had
  marked OPEN). The data files are not scanned.
- A failed write or index commit never loses or corrupts a block already stored: reads go on. The region
  being written is refused (its blocks dropped: a miss, never wrong bytes) and the tier turns *degraded*
  (``admitting`` False, ``fault`` says why, logged once per change of state): it refuses new blocks
  (``degraded_rejected``), then after ``_FIRST_RETRY_S`` admits again as a probe; a probe that fails doubles
  the pause up to ``_MAX_RETRY_S``; the first region written and committed again ends it (logged). Blocks a
  failed index commit could not record stay readable, and that commit is retried with the next (no index
  change is lost). No space on the filesystem of a data file or of the index (ENOSPC/EDQUOT) is
  ``fault="full"``, the index's LMDB map used up ``fault="index_full"``: both counted in ``disk_full_errors``
  and logged with what to do. A full map also caps the blocks the tier holds at 3/4 of what it held then
  (``_INDEX_FULL_SHRINK``, again at each full map): the next region opened first evicts the oldest regions
  down to the cap, which makes room in the index for the probe, and later regions are taken by eviction.
  Other failures are ``io_errors``; a damaged index (``IndexDamagedError``) is ``fault="damaged"`` and
  refuses until a restart.
- A damaged index (an LMDB file cut short, which a mapping would turn into SIGBUS) is detected before it is
  mapped, logged, and rebuilt from the entry headers of the data files (``kvtier.disk.rebuild``); so is one
  LMDB reports corrupt while the tier opens. The key epochs come back from the epoch file
  (``kvtier.disk.epoch_file``, written durably before the index at every ``write_epoch``); where it is
  missing or invalid the epochs are unknown and the tier starts empty instead, its regions' first pages
  zeroed so that no later rebuild finds their blocks (else the blocks of an older epoch would be served to
  keys derived under it again).
- Every field of an index record that a read goes on (length, codec, byte planes) must match the entry's
  verified header: LMDB's pages carry no checksum, and a damaged record is a miss like a damaged entry.
- ``flush`` and ``close`` write the region being opened too (it holds the blocks reinserted from the
  region it replaces, whose older copies its OPEN mark forgets), waiting for its opening first.
- A start that fails (no room for the data file, a damaged index) leaves no data file it preallocated.
- Only one process opens a directory at a time (``DirectoryLockedError``); another format version or
  layout is refused (``FormatVersionError`` / ``LayoutMismatchError``) unless ``wipe_incompatible``.
- Payload I/O goes straight between the files and the caller's tensors (O_DIRECT where supported); only
  the zstd codec, when enabled, stages bytes in between.
- Thread-safe. ``close`` is idempotent; every other call after it raises ``ClosedError`` (``stats`` still
  answers). ``close`` returns within ``timeout_s`` (default ``CLOSE_WAIT_S``): a drive that has not finished
  the last writes and reads by then is left to the tier's threads (logged once), and the files, the index and
  the directory lock stay open until the process exits, never unmapped under a write still running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from kvtier.config import DiskConfig
from kvtier.disk.codec import ZstdCodec
from kvtier.disk.device import Device, FileDevice, aligned_buffer, copy_bytes, supports_direct_io, tensor_view
from kvtier.disk.epoch_file import EPOCH_FILE, read_epoch_file, write_epoch_file
from kvtier.disk.format import (
    CODEC_NONE,
    CODEC_ZSTD,
    FORMAT_VERSION,
    HEADER_BYTES,
    PAGE_BYTES,
    EntryHeader,
    checksum,
    entry_bytes,
    pack_header,
    parse_header,
    round_up,
)
from kvtier.disk.index import DiskIndex, Forget, IndexEntry, OpenRegion, RegionState, SealRegion, wait_by
from kvtier.disk.index_check import damage, walk_fault
from kvtier.disk.rebuild import scan_regions
from kvtier.errors import (
    ClosedError,
    ConfigError,
    DirectoryLockedError,
    DiskError,
    DiskFullError,
    FlushTimeoutError,
    FormatVersionError,
    IndexDamagedError,
    IndexFullError,
    InvalidInputError,
    LayoutMismatchError,
)
from kvtier.keys import check_key
from kvtier.layout import KVLayout

_LOG = logging.getLogger(__name__)
# How long ``close`` waits for the last region writes, index commits and reads.
CLOSE_WAIT_S = 30.0
# The fewest region buffers: one region fills while two are written (a write also waits on fdatasync and an
# index commit): with two, the drive sat idle during those waits and writes reached about 0.6x of raw.
_PREFAULTED_REGIONS = 3
_WRITER_THREADS = 2
# Bytes of an open region written behind its appends at a time: large sequential writes, started early.
_STREAM_BYTES = 8 * 1024 * 1024
_DATA_FILE = "kvtier-data.bin"
_LOCK_FILE = "kvtier.lock"
_INDEX_DIR = "kvtier-index"
# Seconds a degraded tier refuses new blocks before it admits again as a probe, doubled by each failed probe
# up to the maximum: space freed by the operator (or index room freed by evictions) is found within a minute
# at most, while a fault that persists costs at most one failed region write a minute.
_FIRST_RETRY_S = 1.0
_MAX_RETRY_S = 60.0
# The share of its blocks a tier whose index map filled up keeps: LMDB copies the pages a commit touches,
# so an index needs free pages besides its entries; a quarter of them freed leaves room for the next commits.
_INDEX_FULL_SHRINK = 0.75
Fault = Literal["", "full", "index_full", "io_error", "damaged"]

DeviceFactory = Callable[[str, int, bool], Device]
ReadStatus = Literal["ok", "corrupt", "io_error"]
_Bytes = npt.NDArray[np.uint8]


class Admission(Protocol):
    """What the tier needs of an admission policy (``kvtier.disk.admission.AdmissionPolicy``)."""

    def on_access(self, key: Hashable, hit: bool) -> None: ...

    def admit(self, key: Hashable) -> bool: ...

    @property
    def exclusive(self) -> bool: ...


@dataclass(frozen=True)
class DiskStats:
    """A snapshot of the disk tier's counters (they only grow, except ``used_blocks``, ``admitting`` and
    ``fault``: "" when healthy, else why the tier is degraded: "full", "index_full", "io_error", "damaged")."""

    capacity_blocks: int
    used_blocks: int
    bytes_written: int
    bytes_read: int
    hits: int
    misses: int
    checksum_failures: int
    torn_regions_discarded: int
    regions_evicted: int
    blocks_reinserted: int
    blocks_moved_to_host: int
    regions_freed: int
    admissions_rejected: int
    budget_rejected: int
    busy_rejected: int
    io_errors: int
    disk_full_errors: int
    degraded_rejected: int
    admitting: bool
    fault: Fault
    direct_io: bool


_COUNTERS = ("bytes_written", "bytes_read", "hits", "misses", "checksum_failures", "torn_regions_discarded",
             "regions_evicted", "blocks_reinserted", "blocks_moved_to_host", "regions_freed", "admissions_rejected",
             "budget_rejected", "busy_rejected", "io_errors", "disk_full_errors", "degraded_rejected")


class _Region:
    """One region slot. ``buffer`` is set while it is open or being written (reads are served from it)."""

    __slots__ = ("buffer", "id", "keys", "open_ticket", "readers", "seq", "streamed", "used", "writes")

    def __init__(self, region_id: int) -> None:
        self.id = region_id
        self.keys: list[bytes] = []
        self.open_ticket = 0  # the index change that marked it OPEN; committed before the slot is rewritten
        self.buffer: _Bytes | None = None
        self.used = 0
        self.streamed = 0  # bytes from the start submitted for writing while the region fills
        self.writes: list[Future[None]] = []  # those writes, waited for before the region's sync
        self.readers = 0
        self.seq = 0


@dataclass(slots=True)
class _Entry:
    loc: IndexEntry
    hits: int = 0


class _TokenBucket:
    """``rate`` bytes per second on average, bursts up to ``burst`` bytes."""

    def __init__(self, rate: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self, nbytes: int, force: bool = False) -> bool:
        """Spend ``nbytes`` if there are that many tokens (or always, with ``force``: may go into debt)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < nbytes and not force:
            return False
        self.tokens -= nbytes
        return True


def data_file_bytes(path: str) -> int:
    """Bytes of the drive the tier's data file in ``path`` holds (0 if there is none): space that the tier
    would take again if it opened there, so a capacity sized from the free space counts it as free."""
    try:
        return os.stat(os.path.join(path, _DATA_FILE)).st_blocks * 512
    except FileNotFoundError:
        return 0


class DiskTier:
    """See the module docstring. ``admission=None`` admits every offered block. ``device_factory(path,
    size_bytes, direct_io)`` opens each data file (tests pass one that returns ``MemoryDevice``s)."""

    def __init__(self, config: DiskConfig, layout: KVLayout, admission: Admission | None = None, *,
                 device_factory: DeviceFactory = FileDevice) -> None:
        if not config.paths:
            raise ConfigError("disk.paths is empty: the disk tier needs at least one directory")
        self.layout, self._admission = layout, admission
        # Set by the owner: whether a tier above (host RAM) holds a key. Called under the tier's lock, so it
        # must not take a lock of its own (``HostTier.holds``).
        self.held_above: Callable[[bytes], bool] | None = None
        # Set by the owner: told the keys this tier stopped holding (evicted, lost to a write error, dropped),
        # under the tier's lock, so it too must not take a lock that is held while calling into this tier.
        self.on_forget: Callable[[list[bytes]], None] | None = None
        self.block_bytes = layout.block_bytes
        self._max_entry = entry_bytes(self.block_bytes)
        if self._max_entry > config.region_bytes:
            raise ConfigError(f"disk.region_bytes ({config.region_bytes}) cannot hold one block entry "
                              f"({self._max_entry} bytes with its header page)")
        # The region size is settled once the index says what the directory was cut into (``_cut``).
        self.config = config
        self._num_paths = len(config.paths)
        self._regions_per_path = 0
        self.capacity_blocks = 0
        # Always able to decode: a directory may hold zstd entries written before codec was set to "none".
        self._zstd = ZstdCodec(layout.torch_dtype.itemsize)
        self._compress = config.codec == "zstd"
        rate = config.budget_bytes_per_s
        burst = max(int(rate * config.write_budget_burst_s), self._max_entry)
        self._budget = _TokenBucket(rate, burst) if rate else None
        # Guards the tables; never held across disk I/O or an index commit. Index changes are enqueued
        # while holding it, so the index applies them in the order the tables changed.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._fault: Fault = ""
        self._retry_at = 0.0  # monotonic time before which a degraded tier refuses new blocks
        self._retry_s = _FIRST_RETRY_S
        self._entry_cap: int | None = None  # the most blocks the index's map has room for (once it was full)
        self._closed = False
        self._opening = False
        self._opening_in_background = False
        self._local = threading.local()
        self._regions: list[_Region] = []
        self._entries: dict[bytes, _Entry] = {}
        self._fifo: deque[int] = deque()
        self._clean: deque[int] = deque()
        self._open: _Region | None = None
        self._next_seq = 1
        self._free_buffers: list[_Bytes] = []
        self._unallocated_buffers = 0
        self._lock_fds: list[int] = []
        self._devices: list[Device] = []
        self._created_files: list[str] = []
        self._rebuild = False
        self._epoch_path = os.path.join(config.paths[0], EPOCH_FILE)
        self._epoch_lock = threading.Lock()
        self._index: DiskIndex | None = None
        self._index_map_bytes = 0
        try:
            self._lock_directories()
            self._open_index()
            self._cut(self._region_bytes_of_directory())
            self._open_devices(device_factory)
            try:
                self._recover()
            except IndexDamagedError as exc:  # LMDB found it corrupt: as good as truncated
                self._remove_damaged_index(str(exc))
                self._index = DiskIndex(os.path.join(self.config.paths[0], _INDEX_DIR), self._index_map_bytes)
                self._recover()
        except BaseException:
            self._release()
            # A start that failed leaves no data file it preallocated: the space goes back to the filesystem.
            for file in self._created_files:
                with contextlib.suppress(OSError):
                    os.unlink(file)
            raise
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvtier-disk")
        # Region writes get threads of their own: a write-back buffer of many sealed regions queued on the
        # read pool would make every read wait behind the whole burst.
        self._writer = ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="kvtier-disk-write")
        # Seals (fdatasync, then the index commit: together about 10 ms here, up to 30 ms behind writes) wait
        # on a thread of their own: on a writer thread they left one thread for the next region's parts (2 MiB
        # blocks: writes at 0.86x of raw with 4 threads, against 0.94x with a sealer; medians of 5 runs).
        # One thread: regions are sealed, and join the FIFO, in the order they filled.
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="kvtier-disk-seal")

    # -- opening and recovery -------------------------------------------------------------------------

    def _lock_directories(self) -> None:
        for path in self.config.paths:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise DirectoryLockedError(f"the disk directory {path} is in use by another process") from exc

    def _region_bytes_of_directory(self) -> int:
        """The region size to open with: the one the directory was written with, where it is at most
        ``disk.region_bytes``, holds an entry and fits the capacity; otherwise ``scaled_region_bytes``.

        ``min_regions`` scales a small tier's regions with its capacity, and the daemon's default capacity
        follows the free space of its filesystem: without this, a restart after the drive filled or a
        raised capacity found the directory cut differently and refused to open (or wiped it)."""
        assert self._index is not None
        scaled = self.config.scaled_region_bytes(self._max_entry)
        try:
            found = self._index.read_meta()
        except IndexDamagedError:
            return scaled  # ``_recover`` meets the damage again and rebuilds the index
        if not found or any(found.get(name) != value for name, value in (
                ("format_version", FORMAT_VERSION), ("layout", self.layout.fingerprint),
                ("num_paths", self._num_paths))):
            return scaled
        recorded = found.get("region_bytes")
        if (not isinstance(recorded, int) or recorded == scaled or recorded % PAGE_BYTES
                or not self._max_entry <= recorded <= min(self.config.region_bytes, self.config.capacity_bytes)):
            return scaled
        _LOG.info("disk directory %s keeps the %d KiB regions it was written with (this configuration would "
                  "cut %d KiB ones into an empty directory; disk.wipe_incompatible starts it empty)",
                  self.config.paths[0], recorded // 1024, scaled // 1024)
        return recorded

    def _cut(self, region_bytes: int) -> None:
        """Size the tier's tables and region buffers for regions of ``region_bytes``."""
        self.config = replace(self.config, region_bytes=region_bytes)
        self._regions_per_path = self.config.capacity_bytes // region_bytes
        num_regions = self._num_paths * self._regions_per_path
        self.capacity_blocks = num_regions * (region_bytes // self._max_entry)
        self._regions = [_Region(region_id) for region_id in range(num_regions)]
        self._free_buffers = [np.frombuffer(aligned_buffer(region_bytes, populate=True), dtype=np.uint8)
                              for _ in range(_PREFAULTED_REGIONS)]
        self._unallocated_buffers = self.config.writeback_regions - _PREFAULTED_REGIONS

    def _open_devices(self, factory: DeviceFactory) -> None:
        size = self._regions_per_path * self.config.region_bytes
        for path in self.config.paths:
            direct = self.config.direct_io != "off" and supports_direct_io(path)
            if self.config.direct_io == "on" and not direct:
                raise DiskError(f"disk.direct_io is 'on' but the filesystem of {path} does not support O_DIRECT")
            file = os.path.join(path, _DATA_FILE)
            try:
                old_size: int | None = os.stat(file).st_size
            except FileNotFoundError:
                old_size = None
                self._created_files.append(file)
            try:
                self._devices.append(factory(file, size, direct))
            except OSError as exc:
                if old_size is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(file, old_size)  # an extension that failed halfway gives its space back
                free = shutil.disk_usage(path).free
                raise DiskError(f"cannot open or preallocate the {size / 2**20:.0f} MiB data file in {path} "
                                f"({free / 2**20:.0f} MiB free): {exc}; lower disk.capacity_bytes or free space "
                                "there") from exc

    def _open_index(self) -> None:
        directory = os.path.join(self.config.paths[0], _INDEX_DIR)
        # Room for an entry record per page of capacity; LMDB only maps address space, the file grows on use.
        map_size = self.config.index_map_bytes or max(64 << 20, self._num_paths * self.config.capacity_bytes
                                                      // PAGE_BYTES * 256)
        # LMDB maps its file: a truncated one would be a SIGBUS, not an error; and it aborts the process on some
        # damaged pages: every record is read in a child first.
        reason = damage(directory) or walk_fault(directory)
        if reason is not None:
            self._remove_damaged_index(reason)
        self._index_map_bytes = map_size
        try:
            self._index = DiskIndex(directory, map_size)
        except IndexDamagedError as exc:
            self._remove_damaged_index(str(exc))
            self._index = DiskIndex(directory, map_size)
        except DiskError:
            if not self.config.wipe_incompatible:
                raise
            _LOG.warning("disk index in %s is unreadable; wiping it (wipe_incompatible)", directory)
            shutil.rmtree(directory, ignore_errors=True)
            self._index = DiskIndex(directory, map_size)

    def _remove_damaged_index(self, reason: str) -> None:
        """Delete a damaged index (closing it if open); ``_recover`` then rebuilds it from the data files."""
        _LOG.error("disk index damaged (%s): rebuilding it from the entry headers of the data files", reason)
        if self._index is not None:
            self._index.close()
            self._index = None
        shutil.rmtree(os.path.join(self.config.paths[0], _INDEX_DIR), ignore_errors=True)
        self._rebuild = True

    def _erase_regions(self) -> None:
        """Zero the first page of every region, so that no later rebuild finds the entries they hold."""
        zeros = memoryview(aligned_buffer(PAGE_BYTES))
        try:
            for region in range(self._regions_per_path * self._num_paths):
                self._devices[region % self._num_paths].write(region // self._num_paths * self.config.region_bytes,
                                                              zeros)
            for device in self._devices:
                device.sync()
        except OSError as exc:
            raise DiskError(f"cannot erase the regions of the disk tier in {self.config.paths[0]}: {exc}") from exc

    def _recover(self) -> None:
        assert self._index is not None
        expected = {"format_version": FORMAT_VERSION, "layout": self.layout.fingerprint,
                    "region_bytes": self.config.region_bytes, "num_paths": self._num_paths}
        found = self._index.read_meta()
        if found is None or (found != expected and self._wipe_allowed(found, expected)):
            self._index.reset(expected)
        recorded = read_epoch_file(self._epoch_path)
        if self._rebuild and recorded is None:
            # The epochs went with the index: rebuilt, it would serve blocks of an older epoch to its keys again.
            _LOG.error("disk tier %s: the key epochs were lost with the index (no valid %s): starting empty",
                       self.config.paths[0], EPOCH_FILE)
            self._erase_regions()
            recorded = {}
        elif self._rebuild:
            scanned = scan_regions(self._devices, self._regions_per_path, self.config.region_bytes, self.block_bytes)
            for seq, (region_id, found_entries) in enumerate(sorted(scanned.items()), start=1):
                self._index.enqueue(SealRegion(region_id, seq, tuple(found_entries)))
            self._index.wait()
            _LOG.warning("disk index rebuilt: %d blocks in %d regions (their order of eviction is by region now)",
                         sum(map(len, scanned.values())), len(scanned))
        # Both records agree from here on, at the larger epoch of each scope (the file is written first, so it
        # is the larger where a crash came between the two; a directory of an older kvtier has no file yet).
        indexed = self._index.read_epochs()
        epochs = {scope: max(indexed.get(scope, 0), (recorded or {}).get(scope, 0))
                  for scope in {*indexed, *(recorded or {})}}
        for scope, epoch in epochs.items():
            if indexed.get(scope) != epoch:
                self._index.write_epoch(scope, epoch)
        if recorded != epochs:
            try:
                write_epoch_file(self._epoch_path, epochs)
            except OSError as exc:
                raise DiskError(f"cannot record the key epochs in {self._epoch_path}: {exc}") from exc
        regions, entries = self._index.load()
        sealed = sorted((seq, region) for region, (state, seq) in regions.items()
                        if state == RegionState.SEALED and region < len(self._regions))
        sealed_ids = {region for _, region in sealed}
        torn = [region for region, (state, _) in regions.items() if state == RegionState.OPEN]
        stale = [region for region in regions if region not in sealed_ids and region not in torn]
        kept = {key: entry for key, entry in entries.items()
                if entry.region in sealed_ids and entry.path == entry.region % self._num_paths}
        dropped = tuple(key for key in entries if key not in kept)
        if torn or stale or dropped:
            self._index.wait(self._index.enqueue(Forget(tuple(torn + stale), dropped)))
        self._counters["torn_regions_discarded"] = len(torn)
        for key, entry in kept.items():
            self._entries[key] = _Entry(entry)
            self._regions[entry.region].keys.append(key)
        for seq, region in sealed:
            self._regions[region].seq = seq
            self._fifo.append(region)
        self._clean.extend(region for region in range(len(self._regions)) if region not in sealed_ids)
        self._next_seq = sealed[-1][0] + 1 if sealed else 1

    def _wipe_allowed(self, found: dict[str, object], expected: dict[str, object]) -> bool:
        """True to wipe an incompatible directory; raises the precise error when wiping is not allowed."""
        where = self.config.paths[0]
        if self.config.wipe_incompatible:
            _LOG.warning("disk directory %s was written with %s, expected %s; wiping it", where, found, expected)
            return True
        if found.get("format_version") != FORMAT_VERSION:
            raise FormatVersionError(f"{where} holds disk format {found.get('format_version')!r}, this kvtier "
                                     f"writes {FORMAT_VERSION}; set disk.wipe_incompatible to start empty")
        if found.get("layout") != self.layout.fingerprint:
            raise LayoutMismatchError(f"{where} holds blocks of layout {found.get('layout')!r}, not "
                                      f"{self.layout.fingerprint!r}; set disk.wipe_incompatible to start empty")
        raise DiskError(f"{where} was created with region_bytes={found.get('region_bytes')} and "
                        f"{found.get('num_paths')} path(s), this configuration gives "
                        f"region_bytes={expected.get('region_bytes')} and {expected.get('num_paths')} (a "
                        f"directory keeps its regions only while they are at most disk.region_bytes and fit "
                        f"disk.capacity_bytes, and keeps its number of paths); set disk.wipe_incompatible to "
                        f"start empty")

    # -- public API -----------------------------------------------------------------------------------

    @property
    def direct_io(self) -> bool:
        return all(device.direct_io for device in self._devices)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            self._check_open()
            return key in self._entries

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """``contains`` of every key under one acquisition of the lock (the index is a dict in memory)."""
        with self._lock:
            self._check_open()
            entries = self._entries
            return [key in entries for key in keys]

    def on_access(self, keys: Sequence[bytes], hit_flags: Sequence[bool]) -> None:
        if len(keys) != len(hit_flags):
            raise InvalidInputError(f"{len(keys)} keys but {len(hit_flags)} hit flags")
        with self._lock:
            self._check_open()
            if self._admission is not None:
                for key, hit in zip(keys, hit_flags, strict=True):
                    self._admission.on_access(key, hit)

    def offer(self, key: bytes, payload: torch.Tensor, *, wait: bool = True) -> bool:
        """Write ``payload`` (a uint8 CPU tensor of ``block_bytes``) if admission and the budget allow.

        With ``wait=False`` a block that would have to wait for a region buffer (every buffer is being
        written: the drive is behind) or for a read in flight of the region its room would evict is refused
        and counted in ``busy_rejected`` instead: the store demotes this way, under its own lock, so a slow
        drive costs hits, never the engine's time.
        """
        check_key(key)
        if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.device.type != "cpu"
                or payload.numel() != self.block_bytes or not payload.is_contiguous()):
            raise InvalidInputError(f"a disk payload must be a contiguous uint8 CPU tensor of {self.block_bytes} "
                                    "bytes")
        with self._lock:
            self._check_open()
            if key in self._entries:
                return True
            if self._refusing_locked():
                self._counters["degraded_rejected"] += 1
                return False
            if self._admission is not None and not self._admission.admit(key):
                self._counters["admissions_rejected"] += 1
                return False
        raw = tensor_view(payload)
        codec, planes, stored = CODEC_NONE, 1, raw
        if self._compress:
            packed = self._zstd.encode(raw)
            if packed is not None:
                codec, planes, stored = CODEC_ZSTD, self._zstd.planes, memoryview(packed)
        header = EntryHeader(key, codec, planes, len(stored), len(raw), checksum(stored))
        size = entry_bytes(len(stored))
        with self._lock:
            self._check_open()
            if key in self._entries:
                return True
            if not wait and (self._must_reinsert_to_open_locked(size) or not self._has_room_now_locked(size)):
                self._counters["busy_rejected"] += 1
                return False
            if self._budget is not None and not self._budget.take(size):
                self._counters["budget_rejected"] += 1
                return False
            region, offset = self._reserve_locked(size)
            self._append_locked(region, offset, header, stored)
        return True

    def read_into(self, key: bytes, dst: torch.Tensor) -> bool:
        """Read ``key`` into ``dst`` (blocking); ``True`` only with verified bytes."""
        with self._lock:
            self._check_open()
        return self._read_into(check_key(key), self._dst_view(dst))

    def submit_read(self, key: bytes, dst: torch.Tensor) -> Future[bool]:
        """``read_into`` on the I/O pool; arguments are checked now, in the caller."""
        view = self._dst_view(dst)
        with self._lock:
            self._check_open()
            return self._pool.submit(self._read_into, check_key(key), view)

    def flush(self, deadline: float | None = None) -> None:
        """Seal the open region, write it and wait until every written region (and drop) is in the index.

        ``deadline`` (``time.monotonic``): past it ``FlushTimeoutError``, the writes going on.
        """
        with self._lock:
            self._check_open()
            self._flush_locked(deadline)
        self._wait_index(deadline)

    def drop(self, key: bytes) -> None:
        with self._lock:
            self._check_open()
            self._drop_locked(key)

    def moved_to_host(self, key: bytes) -> bool:
        """Host RAM committed its copy of ``key``, read from this tier: drop this tier's copy if the admission
        policy runs the disk exclusive of host RAM (host RAM's eviction offers the block again); returns
        whether it was dropped. The caller must hold a committed host copy: this copy is then not the last."""
        with self._lock:
            self._check_open()
            if self._admission is None or not self._admission.exclusive or key not in self._entries:
                return False
            self._drop_locked(key)
            self._counters["blocks_moved_to_host"] += 1
            return True

    def read_epochs(self) -> dict[str, int]:
        """The store's key epochs recorded in this tier (``kvtier.epochs``)."""
        assert self._index is not None
        return self._index.read_epochs()

    def write_epoch(self, scope: str, epoch: int) -> None:
        """Record a key epoch in this tier, durably: in its epoch file, then in its index."""
        with self._lock:
            self._check_open()
        assert self._index is not None
        with self._epoch_lock:
            try:
                write_epoch_file(self._epoch_path, {**self._index.read_epochs(), scope: epoch})
            except OSError as exc:
                raise DiskError(f"cannot record the key epoch of {scope!r} in {self._epoch_path}: {exc}") from exc
            self._index.write_epoch(scope, epoch)

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(capacity_blocks=self.capacity_blocks, used_blocks=len(self._entries),
                             admitting=not self._fault, fault=self._fault, direct_io=self.direct_io,
                             **self._counters)

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Write the open region, wait for the tier's threads and release the files; see the module promises."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked(deadline)
                written = True
            except FlushTimeoutError:
                written = False
            finally:
                self._closed = True
        # The executors' own shutdown cannot time out: one thread waits for all three, joined with the deadline.
        stopper = threading.Thread(target=self._stop_threads, name="kvtier-disk-close", daemon=True)
        stopper.start()
        stopper.join(max(0.0, deadline - time.monotonic()))
        try:
            if written and not stopper.is_alive():
                self._wait_index(deadline)
                self._release()
                return
        except FlushTimeoutError:
            pass
        _LOG.warning("disk tier %s: the drive did not finish its writes or reads within %.0f s of close; its "
                     "files and directory lock stay open until they do or the process exits",
                     self.config.paths[0], timeout_s)

    def _stop_threads(self) -> None:
        for executor in (self._writer, self._sealer, self._pool):
            executor.shutdown(wait=True)

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------------

    def _reserve_locked(self, size: int) -> tuple[_Region, int]:
        """Room for ``size`` bytes in the open region, sealing it and opening another when it is full."""
        while True:
            self._check_open()
            region = self._open
            if region is not None and region.used + size <= self.config.region_bytes:
                offset, region.used = region.used, region.used + size
                return region, offset
            if self._opening:
                self._cond.wait()
                continue
            self._seal_locked()
            self._open = self._open_region_locked()

    def _has_room_now_locked(self, size: int) -> bool:
        """Whether ``_reserve_locked(size)`` would return without waiting on a region write."""
        region = self._open
        if region is not None and region.used + size <= self.config.region_bytes:
            return True
        return (not self._opening and bool(self._free_buffers or self._unallocated_buffers)
                and bool(self._clean or self._fifo) and not self._open_waits_for_reads_locked())

    def _open_waits_for_reads_locked(self) -> bool:
        """Whether opening a region now would wait for a read in flight: of a region ``_shed_locked`` would
        evict, or of the one ``_evict_locked`` would (a drive slow to answer would hold the caller as long)."""
        live, fifo, shed = len(self._entries), list(self._fifo), False
        while self._entry_cap is not None and live > self._entry_cap and len(fifo) > 1:
            region = self._regions[fifo.pop(0)]
            if region.readers:
                return True
            live, shed = live - len(self._live_entries_locked(region)), True
        # As ``_next_is_clean_locked`` will answer once the shed regions went back to the clean ones.
        if (self._clean or shed) and (self._entry_cap is None or live < self._entry_cap or not fifo):
            return False
        return bool(fifo) and self._regions[fifo[0]].readers > 0

    def _must_reinsert_to_open_locked(self, size: int) -> bool:
        """Whether room for ``size`` bytes means evicting a region whose hot blocks are re-read from the drive;
        if so, the next region is opened on the I/O pool (the caller may hold the store's lock)."""
        region = self._open
        if ((region is not None and region.used + size <= self.config.region_bytes) or self._next_is_clean_locked()
                or not self._fifo):
            return False
        threshold = self.config.reinsert_hits
        oldest = self._regions[self._fifo[0]]
        if not (threshold and any(entry.hits >= threshold for _, entry in self._live_entries_locked(oldest))):
            return False
        if not (self._opening or self._opening_in_background):
            self._opening_in_background = True
            self._pool.submit(self._open_next, size)
        return True

    def _open_next(self, size: int) -> None:
        """On the I/O pool: seal the full open region and open the next one, reading its hot blocks here."""
        with self._lock:
            try:
                region = self._open
                if self._closed or self._opening or (region is not None
                                                     and region.used + size <= self.config.region_bytes):
                    return
                self._seal_locked()
                self._open = self._open_region_locked()
            finally:
                self._opening_in_background = False
                self._cond.notify_all()

    def _append_locked(self, region: _Region, offset: int, header: EntryHeader, stored: memoryview) -> None:
        buffer = region.buffer
        assert buffer is not None
        payload_at = offset + PAGE_BYTES
        end = offset + entry_bytes(header.stored_len)
        buffer[offset:payload_at] = 0
        header_checksum = pack_header(header, buffer.data[offset : offset + HEADER_BYTES])
        copy_bytes(buffer, payload_at, stored)
        buffer[payload_at + header.stored_len : end] = 0  # no stale bytes of an older block on disk
        self._entries[header.key] = _Entry(IndexEntry(
            region.id % self._num_paths, region.id, offset, header.stored_len, header.raw_len, header.codec,
            header.planes, header_checksum, header.payload_checksum))
        region.keys.append(header.key)
        if region.used - region.streamed >= _STREAM_BYTES and region.used == end:
            # Appends end where reservations do (one offer at a time under the lock): the bytes are in place.
            region.writes.append(self._writer.submit(self._write_part, region, region.streamed, end))
            region.streamed = end

    def _seal_locked(self) -> None:
        region = self._open
        if region is None or region.used == 0:
            return
        self._open = None
        region.seq, self._next_seq = self._next_seq, self._next_seq + 1
        if region.used > region.streamed:  # its last bytes, queued behind its other parts
            region.writes.append(self._writer.submit(self._write_part, region, region.streamed, region.used))
            region.streamed = region.used
        self._sealer.submit(self._write_region, region)

    def _flush_locked(self, deadline: float | None = None) -> None:
        # A region being opened (by an offer, or on the I/O pool) becomes the open region with the hot blocks
        # it reinserted, whose older copies its OPEN mark forgets: it must be written too, so it is waited for
        # and sealed like any other.
        while self._opening or self._opening_in_background:
            wait_by(self._cond, deadline, "a disk region being opened did not open")
        self._seal_locked()
        while any(region.buffer is not None and region is not self._open for region in self._regions):
            wait_by(self._cond, deadline, "the disk tier's regions were not written")

    def _open_region_locked(self) -> _Region:
        """A region to fill: a clean one, else the oldest sealed one evicted (hot blocks reinserted)."""
        self._opening = True
        try:
            # Wait for a buffer and for a region that is not being written (all may be, with few regions).
            while not (self._free_buffers or self._unallocated_buffers) or not (self._clean or self._fifo):
                self._cond.wait()
                self._check_open()  # closed meanwhile: nothing may be evicted or opened any more
            if not self._free_buffers:
                # Not populated: its pages fault in as blocks are copied in, at memory speed.
                self._unallocated_buffers -= 1
                self._free_buffers.append(np.frombuffer(aligned_buffer(self.config.region_bytes), dtype=np.uint8))
            buffer = self._free_buffers.pop()
            self._shed_locked()
            hot: list[tuple[bytes, _Entry]] = []
            dropped: list[bytes] = []
            if self._next_is_clean_locked():
                region = self._regions[self._clean.popleft()]
            else:
                region, hot, dropped = self._evict_locked()
            region.keys, region.used, region.buffer, region.streamed, region.writes = [], 0, buffer, 0, []
            assert self._index is not None
            region.open_ticket = self._index.enqueue(OpenRegion(region.id, tuple(dropped)))
            # Commit the OPEN mark while the region fills, so its write does not wait for an fsync first.
            self._pool.submit(self._commit_soon, region.open_ticket)
            if hot:
                self._reinsert_locked(region, hot)
            self._forgotten_locked([key for key in dropped if key not in self._entries])
            return region
        finally:
            self._opening = False
            self._cond.notify_all()

    def _next_is_clean_locked(self) -> bool:
        """Whether the next region opened is a clean one (else the oldest sealed one is evicted)."""
        return bool(self._clean) and (self._entry_cap is None or len(self._entries) < self._entry_cap
                                      or not self._fifo)

    def _shed_locked(self) -> None:
        """Evict the oldest regions (no reinsertion) until the tier holds at most ``_entry_cap`` blocks: their
        entries leave the index with the next commit, so a full index map has room again."""
        assert self._index is not None
        while self._entry_cap is not None and len(self._entries) > self._entry_cap and len(self._fifo) > 1:
            region = self._regions[self._fifo.popleft()]
            victims = [key for key, _ in self._live_entries_locked(region)]
            for key in victims:
                del self._entries[key]
            self._forgotten_locked(victims)
            while region.readers:  # a read in flight must finish before the slot is reused
                self._cond.wait()
            region.keys = []
            self._index.enqueue(Forget(regions=(region.id,), keys=tuple(victims)))
            self._counters["regions_evicted"] += 1
            self._clean.append(region.id)

    def _evict_locked(self) -> tuple[_Region, list[tuple[bytes, _Entry]], list[bytes]]:
        region = self._regions[self._fifo.popleft()]
        victims = self._live_entries_locked(region)
        for key, _ in victims:
            del self._entries[key]
        while region.readers:  # a read in flight must finish before the slot is reused
            self._cond.wait()
        self._counters["regions_evicted"] += 1
        threshold = self.config.reinsert_hits
        held = self.held_above
        # A block a tier above holds is not reinserted: its eviction there offers it again (exclusive caching).
        hot = [(key, entry) for key, entry in victims
               if threshold and entry.hits >= threshold and not (held is not None and held(key))]
        return region, hot, [key for key, _ in victims]

    def _live_entries_locked(self, region: _Region) -> list[tuple[bytes, _Entry]]:
        """The table's entries stored in ``region``, each once (a key dropped and offered again is listed
        twice in ``region.keys``)."""
        live = {key: entry for key in region.keys
                if (entry := self._entries.get(key)) is not None and entry.loc.region == region.id}
        return list(live.items())

    def _reinsert_locked(self, region: _Region, hot: list[tuple[bytes, _Entry]]) -> None:
        """Copy hot entries of the evicted slot (read synchronously from disk) into its new buffer."""
        buffer = region.buffer
        assert buffer is not None
        view = buffer.data
        placed: list[tuple[bytes, IndexEntry]] = []
        failed: list[ReadStatus] = []
        used = 0
        self._lock.release()  # the region is not yet open to anyone: read without blocking the tier
        try:
            for key, entry in hot:
                size = entry_bytes(entry.loc.stored_len)
                status = self._read_entry(entry.loc, key, view[used : used + PAGE_BYTES],
                                          view[used + PAGE_BYTES : used + size])
                if status == "ok":
                    placed.append((key, replace(entry.loc, region=region.id, offset=used)))
                    used += size
                else:
                    failed.append(status)
        finally:
            self._lock.acquire()
        region.used = used
        for key, loc in placed:
            if key not in self._entries:
                self._entries[key] = _Entry(loc)
                region.keys.append(key)
        if self._budget is not None:
            self._budget.take(used, force=True)  # reinsertion writes flash too: charge it, never refuse it
        self._counters["blocks_reinserted"] += len(placed)
        self._counters["bytes_read"] += used
        self._counters["io_errors"] += failed.count("io_error")
        self._counters["checksum_failures"] += failed.count("corrupt")

    def _write_region(self, region: _Region) -> None:
        """On the sealer thread: wait for every part of the region to be written (each waited until the slot
        was marked OPEN, what it held forgotten), fdatasync, then commit its entries with its SEALED mark.

        The buffer goes back to the pool as soon as the data is synced (reads then go to the file), so the
        index commit overlaps the next region's write instead of delaying it.
        """
        assert region.buffer is not None and self._index is not None
        try:
            # Wait for every part before anything else, so none lands after the slot is reused.
            failures = [error for error in (write.exception() for write in region.writes) if error is not None]
            if failures:
                raise failures[0]
            self._devices[region.id % self._num_paths].sync()
        except Exception as exc:  # any failure, not only OSError: the buffer must come back or flush would hang

            with self._lock:
                lost = [key for key, _ in self._live_entries_locked(region)]
                for key in lost:
                    del self._entries[key]
                self._forgotten_locked(lost)
                region.keys, region.used = [], 0
                # The index still marks the slot OPEN: a restart discards whatever reached it.
                self._clean.append(region.id)
                self._release_buffer_locked(region)
                self._fail_locked(exc, self.config.paths[region.id % self._num_paths])
            return
        with self._lock:
            live = tuple((key, entry.loc) for key, entry in self._live_entries_locked(region))
            seq = region.seq
            ticket = self._index.enqueue(SealRegion(region.id, seq, live))
            self._counters["bytes_written"] += region.used
            self._fifo.append(region.id)
            self._release_buffer_locked(region)
            self._free_if_empty_locked(region)
        try:
            self._index.wait(ticket)
        except DiskError as exc:
            self._unseal(region, seq, ticket, exc)
            return
        with self._lock:
            self._recovered_locked()

    def _unseal(self, region: _Region, seq: int, ticket: int, exc: DiskError) -> None:
        """The index could not record ``region``'s entries: take them back out of its queue and drop the
        blocks (the index still marks the slot OPEN, so a restart discards it too). If a retry committed them
        meanwhile, the region stays. Outside the tier's lock: ``withdraw`` may wait for a commit in flight."""
        assert self._index is not None
        withdrawn = self._index.withdraw(ticket)
        with self._lock:
            # Unless it was evicted meanwhile (its entries are gone then, and the slot is someone else's).
            if withdrawn and region.seq == seq and region.buffer is None and region.id in self._fifo:
                self._fifo.remove(region.id)
                lost = [key for key, _ in self._live_entries_locked(region)]
                for key in lost:
                    del self._entries[key]
                self._forgotten_locked(lost)
                while region.readers:  # its blocks were readable from the file: let reads finish first
                    self._cond.wait()
                region.keys = []
                self._clean.append(region.id)
            self._fail_locked(exc, self.config.paths[0])

    def _write_part(self, region: _Region, start: int, stop: int) -> None:
        """Write bytes ``[start, stop)`` of ``region``'s buffer to its place, once the slot is marked OPEN."""
        assert region.buffer is not None and self._index is not None
        self._index.wait(region.open_ticket)
        if stop > start:
            self._devices[region.id % self._num_paths].write(self._file_offset(region.id) + start,
                                                             region.buffer.data[start:stop])

    def _commit_soon(self, ticket: int) -> None:
        # A failure is not lost: the region's writer waits for the same ticket, gets the error and handles it.
        with contextlib.suppress(DiskError):
            assert self._index is not None
            self._index.wait(ticket)

    def _release_buffer_locked(self, region: _Region) -> None:
        assert region.buffer is not None
        self._free_buffers.append(region.buffer)
        region.buffer = None
        self._cond.notify_all()

    def _refusing_locked(self) -> bool:
        """Whether a degraded tier refuses new blocks now (else it is healthy, or it admits them as a probe)."""
        return self._fault == "damaged" or (bool(self._fault) and time.monotonic() < self._retry_at)

    def _fail_locked(self, exc: BaseException, path: str) -> None:
        """Count a failed write or index commit in ``path`` and turn (or stay) degraded; see the docstring."""
        full = isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC,
                                                                                            errno.EDQUOT))
        fault: Fault = ("damaged" if isinstance(exc, IndexDamagedError) else "index_full"
                        if isinstance(exc, IndexFullError) else "full" if full else "io_error")
        if fault == "index_full":
            held = max(self.config.region_bytes // self._max_entry, int(len(self._entries) * _INDEX_FULL_SHRINK))
            self._entry_cap = held if self._entry_cap is None else min(self._entry_cap, held)
        self._counters["disk_full_errors" if full else "io_errors"] += 1
        now = time.monotonic()
        if self._fault == "damaged":
            return
        if self._fault == fault:
            if now >= self._retry_at:  # a probe failed: wait longer before the next
                self._retry_s = min(2 * self._retry_s, _MAX_RETRY_S)
                self._retry_at = now + self._retry_s
            return
        self._fault, self._retry_s = fault, _FIRST_RETRY_S
        self._retry_at = now + self._retry_s
        stored = len(self._entries)
        if fault == "damaged":
            _LOG.error("disk tier %s: %s; still serving the %d blocks stored", path, exc, stored)
        elif full:
            what = exc if isinstance(exc, DiskFullError) else (
                f"no space left on the filesystem of {path} ({exc}); free space there or lower disk.capacity_bytes")
            _LOG.error("disk tier %s is full: %s. New blocks are refused, the %d stored are still served; "
                       "admission is retried after %g s, then at most every %g s", path, what, stored,
                       self._retry_s, _MAX_RETRY_S)
        else:
            _LOG.error("disk tier %s: a write or index commit failed (%s); new blocks are refused, the %d stored "
                       "are still served; admission is retried after %g s, then at most every %g s", path, exc,
                       stored, self._retry_s, _MAX_RETRY_S)

    def _recovered_locked(self) -> None:
        """A region was written and committed: a degraded tier (not a damaged one) is healthy again."""
        if self._fault and self._fault != "damaged":
            _LOG.warning("disk tier %s: writes and index commits work again (after %s); admitting blocks",
                         ", ".join(self.config.paths), self._fault)
            self._fault, self._retry_s = "", _FIRST_RETRY_S

    # -- reading --------------------------------------------------------------------------------------

    def _dst_view(self, dst: torch.Tensor) -> memoryview:
        need = round_up(self.block_bytes)
        if (not isinstance(dst, torch.Tensor) or dst.dtype != torch.uint8 or dst.device.type != "cpu"
                or not dst.is_contiguous() or dst.numel() < need or dst.data_ptr() % PAGE_BYTES):
            raise InvalidInputError(f"a disk read needs a contiguous uint8 CPU tensor of at least {need} bytes "
                                    f"starting {PAGE_BYTES}-aligned")
        return tensor_view(dst)

    def _read_into(self, key: bytes, dst: memoryview) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._counters["misses"] += 1
                return False
            region = self._regions[entry.loc.region]
            if region.buffer is not None:
                status = self._copy_from_memory(region.buffer, entry.loc, dst)
                return self._count_read_locked(key, entry, status)
            region.readers += 1
        try:
            status = self._read_from_disk(entry.loc, key, dst)
        finally:
            with self._lock:
                region.readers -= 1
                if not region.readers:
                    self._cond.notify_all()
        with self._lock:
            return self._count_read_locked(key, entry, status)

    def _count_read_locked(self, key: bytes, entry: _Entry, status: ReadStatus) -> bool:
        if status == "ok":
            self._counters["hits"] += 1
            self._counters["bytes_read"] += entry.loc.raw_len
            entry.hits += 1
            return True
        self._counters["misses"] += 1
        if status == "io_error":
            self._counters["io_errors"] += 1
        else:
            self._counters["checksum_failures"] += 1
            if self._entries.get(key) is entry:
                self._drop_locked(key)
        return False

    def _copy_from_memory(self, buffer: _Bytes, loc: IndexEntry, dst: memoryview) -> ReadStatus:
        start = loc.offset + PAGE_BYTES
        stored = buffer[start : start + loc.stored_len]
        if loc.codec == CODEC_NONE:
            np.frombuffer(dst, dtype=np.uint8)[: loc.raw_len] = stored
            return "ok"
        return self._decode(stored.data, loc, dst)

    def _read_from_disk(self, loc: IndexEntry, key: bytes, dst: memoryview) -> ReadStatus:
        padded = round_up(loc.stored_len)
        if loc.codec == CODEC_NONE:
            if loc.stored_len != self.block_bytes:
                return "corrupt"
            return self._read_entry(loc, key, self._thread_buffer("header", PAGE_BYTES), dst[:padded])
        staging = self._thread_buffer("staging", round_up(self.block_bytes))[:padded]
        status = self._read_entry(loc, key, self._thread_buffer("header", PAGE_BYTES), staging)
        return self._decode(staging[: loc.stored_len], loc, dst) if status == "ok" else status

    def _read_entry(self, loc: IndexEntry, key: bytes, header: memoryview, payload: memoryview) -> ReadStatus:
        """One I/O: the header page into ``header``, the padded payload into ``payload``; then verify."""
        try:
            done = self._devices[loc.path].read(self._file_offset(loc.region) + loc.offset, [header, payload])
        except OSError:
            return "io_error"
        if done != len(header) + len(payload):
            return "corrupt"
        parsed = parse_header(header)
        if parsed is None:
            return "corrupt"
        found, header_checksum = parsed
        # Every field of the index record a read goes on is compared with the verified header: LMDB's pages
        # carry no checksum, and a damaged ``planes`` or ``codec`` would decode verified bytes into others.
        if (found.key != key or header_checksum != loc.header_checksum or found.stored_len != loc.stored_len
                or (found.codec, found.planes, found.raw_len) != (loc.codec, loc.planes, loc.raw_len)
                or checksum(payload[: loc.stored_len]) != found.payload_checksum):
            return "corrupt"
        return "ok"

    def _decode(self, stored: memoryview, loc: IndexEntry, dst: memoryview) -> ReadStatus:
        if loc.codec != CODEC_ZSTD or loc.raw_len != self.block_bytes:
            return "corrupt"
        return "ok" if self._zstd.decode_into(stored, loc.planes, dst[: loc.raw_len]) else "corrupt"

    def _thread_buffer(self, name: str, nbytes: int) -> memoryview:
        """Page-aligned scratch memory owned by the calling thread."""
        buffer: memoryview | None = getattr(self._local, name, None)
        if buffer is None or len(buffer) < nbytes:
            buffer = memoryview(aligned_buffer(nbytes))
            setattr(self._local, name, buffer)
        return buffer[:nbytes]

    # -- helpers --------------------------------------------------------------------------------------

    def _file_offset(self, region_id: int) -> int:
        return region_id // self._num_paths * self.config.region_bytes

    def _forgotten_locked(self, keys: list[bytes]) -> None:
        if keys and self.on_forget is not None:
            self.on_forget(keys)

    def _drop_locked(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._forgotten_locked([key])
        region = self._regions[entry.loc.region]
        if region.buffer is None:
            # On disk: forget it in the index too (committed with the next batch). Still in memory: its
            # region's commit skips keys no longer in the table.
            assert self._index is not None
            self._index.enqueue(Forget(keys=(key,)))
            self._free_if_empty_locked(region)

    def _free_if_empty_locked(self, region: _Region) -> None:
        """A sealed region left without a live block goes back to the clean pool (its record leaves the index
        with the next commit): waiting for its turn in the FIFO would hold dead space a lap. One being read
        waits for that turn, as the reader needs the slot unchanged."""
        if region.readers or any((entry := self._entries.get(key)) is not None and entry.loc.region == region.id
                                 for key in region.keys) or region.id not in self._fifo:
            return
        self._fifo.remove(region.id)
        region.keys = []
        assert self._index is not None
        self._index.enqueue(Forget(regions=(region.id,)))
        self._counters["regions_freed"] += 1
        self._clean.append(region.id)

    def _wait_index(self, deadline: float | None = None) -> None:
        """Wait until every queued index change is committed; a failure degrades the tier."""
        assert self._index is not None
        try:
            self._index.wait(deadline=deadline)
        except DiskError as exc:
            with self._lock:
                self._fail_locked(exc, self.config.paths[0])

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the disk tier is closed")

    def _release(self) -> None:
        if self._index is not None:
            self._index.close()
        for device in self._devices:
            device.close()
        for fd in self._lock_fds:
            os.close(fd)  # closing the descriptor releases the flock
        self._lock_fds = []

