"""kvtier's exception hierarchy: every error kvtier raises on purpose is a ``KvtierError``.

::

    KvtierError
    ├── ConfigError            a setting is out of range or unknown (also a ValueError)
    ├── InvalidInputError      a call's arguments are malformed: key length, dtype, shape (also a ValueError)
    ├── LayoutMismatchError    blocks, a directory or a peer of another KV layout or namespace
    ├── CapacityError          no room can be made without evicting pinned or in-flight blocks
    ├── ClosedError            the store, tier or client was closed by its owner
    ├── TransferError          a copy between memories failed
    ├── JobTimeoutError        a wait on a job ran out of time (also a TimeoutError)
    ├── FlushTimeoutError      a flush did not finish by its deadline (also a TimeoutError)
    ├── DiskError              the disk tier (or one write or index commit of it) failed
    │   ├── DiskFullError          no space on the filesystem of a data file or of the index
    │   │   └── IndexFullError         the index's LMDB map is used up (``disk.index_map_bytes``)
    │   ├── IndexDamagedError      LMDB found the index corrupt (or panicked): no new blocks until a restart
    │   ├── FormatVersionError     a data directory written by another on-disk format
    │   └── DirectoryLockedError   a data directory held by another process
    └── ProtocolError          the daemon and a client disagree on the wire
        ├── AuthError              a remote client without the right token
        ├── ServerError            the daemon answered a request with an error reply
        └── StaleHandleError       a lease or reservation not of the live connection (daemon restart); also an
                                   InvalidInputError

Promises:
- A failed checksum, a torn write or a foreign layout found while *reading* is never raised: it is a miss
  and a counter (see ``StoreStats``). Errors are for callers who passed something wrong or for a tier that
  cannot work at all.
- An operation that raises changes nothing in the store.
"""

from __future__ import annotations


class KvtierError(Exception):
    """Root of every error kvtier raises on purpose."""


class ConfigError(KvtierError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class InvalidInputError(KvtierError, ValueError):
    """A call's arguments are malformed (key length, dtype, shape, byte size, device)."""


class LayoutMismatchError(KvtierError):
    """Blocks, a data directory or a peer belong to another KV layout or namespace."""


class CapacityError(KvtierError):
    """No room can be made without evicting blocks that are pinned or being written."""


class ClosedError(KvtierError):
    """The object was closed by its owner; no further calls are accepted."""


class TransferError(KvtierError):
    """A copy between memories failed."""


class DiskError(KvtierError):
    """The disk tier cannot work (open failed, the directory is unusable)."""


class DiskFullError(DiskError):
    """No space: the filesystem of a data file or of the index is full (ENOSPC, EDQUOT). A condition that
    passes once space is freed."""


class IndexFullError(DiskFullError):
    """The disk index's LMDB map is used up (``disk.index_map_bytes``); evictions make room in it."""


class IndexDamagedError(DiskError):
    """LMDB reported the index corrupt or itself unusable (MDB_CORRUPTED, MDB_PANIC, ...): a permanent fault."""


class FormatVersionError(DiskError):
    """A data directory was written by another version of the on-disk format."""


class DirectoryLockedError(DiskError):
    """A data directory is held by another process."""


class ProtocolError(KvtierError):
    """A frame that breaks the daemon protocol: malformed, oversized, unknown op, wrong version."""


class AuthError(ProtocolError):
    """A remote client presented no token or the wrong one."""


class ServerError(ProtocolError):
    """The daemon answered a request with an error reply; ``kind`` names the daemon-side error class."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class StaleHandleError(ProtocolError, InvalidInputError):
    """A lease or reservation (or its slots) not of the client's live connection to the daemon: one from before
    a daemon restart or a reopened connection (or another client's) never resolves, so it never reads or
    commits another key's slot."""


class JobTimeoutError(KvtierError, TimeoutError):
    """A wait on a job ran out of time; the job goes on and may still be waited on."""


class FlushTimeoutError(KvtierError, TimeoutError):
    """A flush did not finish by its deadline (a drive or server not keeping up); the writes go on."""
