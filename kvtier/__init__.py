"""kvtier: a tiered, content-addressed KV-cache block store for LLM inference.

The public API, re-exported here: ``Store`` (embedded) and ``Client`` (the daemon's, same interface;
``open_store`` picks one from the configuration) with ``LookupResult``, ``Job``/``JobResult``,
``Reservation``/``Lease``; ``KVLayout``; ``BlockHasher``/``Namespace``; the configuration dataclasses and
``load_config``; ``StoreStats``; the exception hierarchy rooted in ``KvtierError``.
"""

from kvtier.config import (
    DaemonConfig,
    DiskConfig,
    HostConfig,
    RemoteConfig,
    StoreConfig,
    TransferConfig,
    load_config,
)
from kvtier.daemon import Client, open_store
from kvtier.errors import (
    AuthError,
    CapacityError,
    ClosedError,
    ConfigError,
    DirectoryLockedError,
    DiskError,
    FlushTimeoutError,
    FormatVersionError,
    InvalidInputError,
    JobTimeoutError,
    KvtierError,
    LayoutMismatchError,
    ProtocolError,
    ServerError,
    StaleHandleError,
    TransferError,
)
from kvtier.job import Job, JobResult
from kvtier.keys import KEY_BYTES, BlockHasher, Namespace
from kvtier.layout import KVLayout
from kvtier.stats import StoreStats, TierStats
from kvtier.store import Lease, LookupResult, Reservation, Store, Tier

__version__ = "0.1.0"

__all__ = [
    "KEY_BYTES", "AuthError", "BlockHasher", "Client", "CapacityError", "ClosedError", "ConfigError", "DaemonConfig",
    "DirectoryLockedError", "DiskConfig", "DiskError", "FlushTimeoutError", "FormatVersionError", "HostConfig",
    "InvalidInputError", "Job", "JobResult", "JobTimeoutError", "KVLayout", "KvtierError", "LayoutMismatchError",
    "Lease", "LookupResult", "Namespace", "ProtocolError", "RemoteConfig", "Reservation", "ServerError",
    "StaleHandleError", "Store", "StoreConfig", "StoreStats", "Tier", "TierStats", "TransferConfig", "TransferError",
    "load_config", "open_store",
]
