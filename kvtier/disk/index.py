"""The disk tier's persistent index in LMDB: where each block lives, which regions are sealed, and a meta record.

Three LMDB databases in one environment:
- ``meta``: one JSON record (format version, layout fingerprint, region size, number of paths), and the
  store's key epochs (``epoch:SCOPE`` -> decimal epoch; ``kvtier.epochs``), which survive a ``reset``.
- ``regions``: region id -> (state, seal sequence). ``OPEN`` means "being filled or written"; ``SEALED``
  means its data was written and fdatasync'ed before its entries were committed.
- ``entries``: 16-byte key -> ``IndexEntry`` (path, region, offset, lengths, codec, checksums).

Changes are group-committed: ``enqueue(change)`` returns a ticket at once (callers enqueue under their own
lock, which fixes the order of changes); ``wait(ticket)`` returns once that change is durable. The first
waiter commits everything queued so far in ONE synced LMDB transaction while later waiters wait for it, so
a busy tier pays about one fsync per region written instead of two.

Promises:
- Changes are applied in ticket order, each whole: a ``SealRegion``'s entries and its SEALED mark appear
  together; an ``OpenRegion`` deletes the entries an evicted region held and marks it OPEN together. After a
  crash the index is as of the end of some committed batch.
- A batch that fails is not lost: its changes stay queued, in order, and the next ``wait`` commits them
  again (a full filesystem that gets space back catches up). ``wait`` raises when an attempt that held its
  ticket failed after the call began; ``withdraw(ticket)`` takes a change that never committed out of the
  queue (a region whose entries the index could not take). A full map grows by half after the failure, so
  that the commits that delete entries (which LMDB, copying pages, needs free pages for) get through.
- Failures are typed: no space (the filesystem's ENOSPC/EDQUOT, an EIO of a short write on a filesystem
  with under 64 MiB free, or LMDB's map full: ``IndexFullError``) is ``DiskFullError`` with what to do;
  corruption or an LMDB panic is ``IndexDamagedError``; anything else ``DiskError``. ``load`` never touches
  the data files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import lmdb

from kvtier.errors import DiskError, DiskFullError, FlushTimeoutError, IndexDamagedError, IndexFullError


def wait_by(cond: threading.Condition, deadline: float | None, what: str) -> None:
    """``cond.wait()`` (its lock held) until ``deadline`` (``time.monotonic``; ``None``: none); past it
    ``FlushTimeoutError`` saying ``what`` was not done by the flush's deadline."""
    left_s = None if deadline is None else deadline - time.monotonic()
    if left_s is not None and left_s <= 0:
        raise FlushTimeoutError(f"{what} by the flush's deadline")
    cond.wait(left_s)


class RegionState(IntEnum):
    OPEN = 1
    SEALED = 2


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where one block's entry lives: ``offset`` bytes into ``region`` of data path ``path``."""

    path: int
    region: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    planes: int
    header_checksum: int
    payload_checksum: int


@dataclass(frozen=True, slots=True)
class OpenRegion:
    """``region`` is about to be (re)written: delete the entries it held (``dropped``) and mark it OPEN."""

    region: int
    dropped: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class SealRegion:
    """``region`` was written and synced: add its entries and mark it SEALED with sequence ``seq``."""

    region: int
    seq: int
    entries: tuple[tuple[bytes, IndexEntry], ...]


@dataclass(frozen=True, slots=True)
class Forget:
    """Delete ``keys`` and the records of ``regions`` (which become free space)."""

    regions: tuple[int, ...] = ()
    keys: tuple[bytes, ...] = ()


Change = OpenRegion | SealRegion | Forget

_ENTRY = struct.Struct("<HIQIIBBQQ")
_REGION_KEY = struct.Struct(">I")  # big-endian, so LMDB's byte order is region order
_REGION = struct.Struct("<BQ")
_META_KEY = b"meta"
# Free bytes below which an I/O error of a commit is taken for a full filesystem (a short write).
_LOW_SPACE_BYTES = 64 << 20
# How much a full map grows, for the commits that make room (see ``_write``).
_MAP_HEADROOM = 1.5
# LMDB's verdicts on the file itself: retrying cannot help, only a restart (which checks the index) can.
# A transaction LMDB itself marked failed before any call of ours failed (a named database's record
# unreadable) is one too.
_DAMAGED = (lmdb.CorruptedError, lmdb.PanicError, lmdb.PageNotFoundError, lmdb.InvalidError,
            lmdb.VersionMismatchError, lmdb.BadChecksumError, lmdb.BadTxnError)
_EPOCH_PREFIX = b"epoch:"


def _pack_entry(entry: IndexEntry) -> bytes:
    return _ENTRY.pack(entry.path, entry.region, entry.offset, entry.stored_len, entry.raw_len, entry.codec,
                       entry.planes, entry.header_checksum, entry.payload_checksum)


class DiskIndex:
    """An LMDB environment in ``directory`` with a group-commit queue of changes (thread-safe)."""

    def __init__(self, directory: str, map_size: int) -> None:
        self._directory, self._map_size = directory, map_size
        self._txn_lock = threading.Lock()  # one transaction at a time: growing the map needs none open
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[int, Change]] = []  # uncommitted changes in ticket order, failed ones included
        self._next_ticket = 1
        self._committing = False
        self._attempts = 0
        # The last failed attempt: its serial number, the highest ticket it held, and why it failed.
        self._failure: tuple[int, int, DiskError] | None = None
        try:
            self._env = lmdb.open(directory, map_size=map_size, max_dbs=3, subdir=True)
            self._meta = self._env.open_db(b"meta")
            self._regions = self._env.open_db(b"regions")
            self._entries = self._env.open_db(b"entries")
        except lmdb.Error as exc:
            raise self._error(exc, "cannot be opened") from exc

    def read_meta(self) -> dict[str, Any] | None:
        with self._read() as txn:
            raw = txn.get(_META_KEY, db=self._meta)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}

    def reset(self, meta: dict[str, Any]) -> None:
        """Forget every region and entry and write ``meta``: the index of an empty directory."""
        with self._write() as txn:
            txn.drop(self._regions, delete=False)
            txn.drop(self._entries, delete=False)
            txn.put(_META_KEY, json.dumps(meta, sort_keys=True).encode(), db=self._meta)

    def read_epochs(self) -> dict[str, int]:
        """Every key epoch recorded with ``write_epoch``, by scope."""
        epochs: dict[str, int] = {}
        with self._read() as txn:
            cursor = txn.cursor(db=self._meta)
            if cursor.set_range(_EPOCH_PREFIX):
                for raw_key, raw in cursor:
                    if not bytes(raw_key).startswith(_EPOCH_PREFIX):
                        break
                    epochs[bytes(raw_key)[len(_EPOCH_PREFIX):].decode()] = int(raw)
        return epochs

    def write_epoch(self, scope: str, epoch: int) -> None:
        """Record ``scope``'s key epoch in a synced transaction of its own (durable when this returns)."""
        with self._write() as txn:
            txn.put(_EPOCH_PREFIX + scope.encode(), str(epoch).encode(), db=self._meta)

    def load(self) -> tuple[dict[int, tuple[RegionState, int]], dict[bytes, IndexEntry]]:
        """Every region record (id -> state, sequence) and every entry."""
        regions: dict[int, tuple[RegionState, int]] = {}
        entries: dict[bytes, IndexEntry] = {}
        with self._read() as txn:
            for raw_key, raw in txn.cursor(db=self._regions):
                state, seq = _REGION.unpack(raw)
                regions[_REGION_KEY.unpack(raw_key)[0]] = (RegionState(state), seq)
            for key, raw in txn.cursor(db=self._entries):
                entries[bytes(key)] = IndexEntry(*_ENTRY.unpack(raw))
        return regions, entries

    def enqueue(self, change: Change) -> int:
        """Queue ``change``; returns its ticket. Cheap: safe to call while holding another lock."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._queue.append((ticket, change))
            return ticket

    def wait(self, ticket: int | None = None, deadline: float | None = None) -> None:
        """Block until the change of ``ticket`` (default: every change queued so far) is committed; raise the
        error of an attempt that held it and failed after this call began (the change stays queued), or
        ``FlushTimeoutError`` once ``deadline`` (``time.monotonic``) passed while another thread commits."""
        with self._cond:
            if ticket is None:
                ticket = self._next_ticket - 1
            started = self._attempts
            while self._pending(ticket):
                failure = self._failure
                if failure is not None and failure[0] > started and failure[1] >= ticket:
                    raise failure[2]
                if self._committing:
                    wait_by(self._cond, deadline, "the disk index did not commit")
                    continue
                batch = list(self._queue)
                self._committing = True
                self._attempts += 1
                attempt = self._attempts
                self._cond.release()
                error: DiskError | None = None
                try:
                    self._commit(change for _, change in batch)
                except DiskError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._committing = False
                    last = batch[-1][0]
                    if error is None:
                        self._queue = [item for item in self._queue if item[0] > last]
                    else:
                        self._failure = (attempt, last, error)
                    self._cond.notify_all()

    def withdraw(self, ticket: int) -> bool:
        """Take the change of ``ticket`` out of the queue; ``False`` if it was committed already."""
        with self._cond:
            while self._committing:  # an attempt in flight may commit it: wait for its outcome
                self._cond.wait()
            kept = [item for item in self._queue if item[0] != ticket]
            withdrawn = len(kept) < len(self._queue)
            self._queue = kept
            return withdrawn

    def _pending(self, ticket: int) -> bool:
        # Changes commit in order: ``ticket`` is done once no change at or before it is queued.
        return bool(self._queue) and self._queue[0][0] <= ticket

    def _commit(self, changes: Iterable[Change]) -> None:
        with self._write() as txn:
            for change in changes:
                match change:
                    case OpenRegion(region, dropped):
                        for key in dropped:
                            txn.delete(key, db=self._entries)
                        txn.put(_REGION_KEY.pack(region), _REGION.pack(RegionState.OPEN, 0), db=self._regions)
                    case SealRegion(region, seq, entries):
                        for key, entry in entries:
                            txn.put(key, _pack_entry(entry), db=self._entries)
                        txn.put(_REGION_KEY.pack(region), _REGION.pack(RegionState.SEALED, seq), db=self._regions)
                    case Forget(regions, keys):
                        for key in keys:
                            txn.delete(key, db=self._entries)
                        for region in regions:
                            txn.delete(_REGION_KEY.pack(region), db=self._regions)

    def close(self) -> None:
        # After any transaction in flight (an epoch written by another thread): closing the environment under
        # an open transaction is undefined in LMDB (a crash of the process, not an error).
        with self._txn_lock:
            self._env.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        with self._txn_lock:
            try:
                with self._env.begin(write=True) as txn:
                    yield txn
            except lmdb.Error as exc:
                error = self._error(exc, "cannot be written")
                if isinstance(error, IndexFullError):
                    # LMDB copies every page a commit touches: even the commit that deletes entries needs free
                    # pages, which a full map lacks. Headroom lets it through; the owner's cap on entries
                    # (``kvtier.disk.tier``) keeps the index near the size it filled.
                    with contextlib.suppress(lmdb.Error):  # without it the retry fails the same way, no worse
                        self._env.set_mapsize(int(self._map_size * _MAP_HEADROOM))
                        self._map_size = int(self._map_size * _MAP_HEADROOM)
                raise error from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Any]:
        with self._txn_lock:
            try:
                with self._env.begin() as txn:
                    yield txn
            except lmdb.Error as exc:
                raise self._error(exc, "cannot be read") from exc

    def _error(self, exc: lmdb.Error, what: str) -> DiskError:
        """The kvtier error for an LMDB failure, saying what to do where the user can do something."""
        where = self._directory
        if isinstance(exc, lmdb.MapFullError):
            return IndexFullError(f"the disk index in {where} is full: its map of {self._map_size // 1024} KiB is "
                                  "used up (grown by half for the evictions that make room); raise "
                                  "disk.index_map_bytes (0 sizes it from disk.capacity_bytes)")
        # The C binding sets ``code``; an error built from Python (the cffi binding) carries it in ``args``.
        code = getattr(exc, "code", None) or next((arg for arg in exc.args[1:2] if isinstance(arg, int)), None)
        try:
            free: int | None = shutil.disk_usage(where).free
        except OSError:
            free = None
        # LMDB 0.9 reports a short write (the filesystem filled up during it) as EIO: low space says which.
        if code in (errno.ENOSPC, errno.EDQUOT) or (code == errno.EIO and free is not None
                                                    and free < _LOW_SPACE_BYTES):
            left = "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free"
            return DiskFullError(f"the filesystem of the disk index {where} is full ({left}): "
                                 f"{os.strerror(code or errno.ENOSPC)}; free space there")
        if isinstance(exc, _DAMAGED):
            return IndexDamagedError(f"the disk index in {where} is damaged ({exc}); new blocks are refused until "
                                     "a restart, which rebuilds it from the data files")
        return DiskError(f"the disk index in {where} {what}: {exc}")
