"""Configuration: small frozen dataclasses, validated at construction, loadable from TOML.

Every default is documented here, once, in the field's comment; ``docs/api.md`` points here.

Promises:
- Constructing a config with a bad value raises ``ConfigError`` naming the field; nothing is half-built.
  Every field's type and range are checked from its annotation (``kvtier.config_fields``): a plain int or
  float is >= 0, ``Positive`` / ``PositiveSize`` >= 1, a ``Size`` also takes ``"64MiB"``, a bool is only
  true or false; the ``__post_init__`` methods add only the checks that relate fields.
- ``load_config(path, overrides)`` reads a TOML file with tables ``[host]``, ``[disk]``, ``[remote]``,
  ``[transfer]``, ``[daemon]`` and top-level keys, then applies ``section.field=value`` overrides (from the
  command line: TOML syntax, except that a string setting takes the text as it is, and a list of strings
  one item or a TOML array); an unknown section or field is a ``ConfigError``, never silently ignored.
- Sizes accept an int of bytes or a string with a binary unit: ``"512MiB"``, ``"4GiB"``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from kvtier.config_fields import SIZE, Port, Positive, PositiveSize, Range, Size, check_fields, field_hint, text_value
from kvtier.config_fields import parse_bytes as parse_bytes
from kvtier.errors import ConfigError
from kvtier.layout import KVLayout

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DirectIO = Literal["auto", "on", "off"]
WriteMode = Literal["back", "through"]
Codec = Literal["none", "zstd"]
TransferBackend = Literal["auto", "cpu", "cuda"]
RemoteMode = Literal["single", "cluster"]


@dataclass(frozen=True)
class HostConfig:
    # Bytes of the shared-memory arena that holds host-tier blocks (rounded down to whole slots).
    capacity_bytes: PositiveSize = 1 * GiB
    # Eviction policy of the host tier: "lru", "s3fifo", "arc" or "s3fifo_adaptive".
    policy: str = "s3fifo"
    # Pinned (page-locked) registration is done in chunks of this many bytes, in the background.
    pin_chunk_bytes: PositiveSize = 256 * MiB
    # Register the arena with CUDA, on the device of the first copy to or from a GPU (none without one).
    pin: bool = True
    # Fault the arena's pages in the background at open, so the first fill runs at memory speed.
    prefault: bool = True
    # Bytes of committed blocks whose host slots stay pinned while one background thread offers them to the
    # write-through tiers (disk.write_mode or remote.write_mode "through"), so a commit does not copy them on
    # its own thread. At most half the pool's slots whatever this says: puts still find room.
    write_through_queue_bytes: PositiveSize = 256 * MiB
    # Milliseconds a commit waits for room in that queue (the drive is behind). Blocks still waiting then are
    # not written through (write_through_skipped_blocks): they stay in the host pool and are demoted on
    # eviction, as in write-back mode.
    write_through_wait_ms: int = 100

    def __post_init__(self) -> None:
        check_fields(self, "host")
        from kvtier.policies import POLICIES

        if self.policy not in POLICIES:
            raise ConfigError(f"host.policy must be one of {sorted(POLICIES)}, got {self.policy!r}")


@dataclass(frozen=True)
class DiskConfig:
    # Data directories; empty means no disk tier. Several paths are striped region by region.
    paths: tuple[str, ...] = ()
    # Bytes of data file per path (preallocated; rounded down to whole regions).
    capacity_bytes: PositiveSize = 16 * GiB
    # Bytes of one region, the unit of writing and of eviction.
    region_bytes: PositiveSize = 64 * MiB
    # The fewest regions the tier is cut into: a tier smaller than min_regions x region_bytes gets smaller
    # regions (down to one block entry), as eviction by a large share of a small disk at once costs hits
    # (coding 1%: +3.4 points with at least 128 regions; docs/policy.md). Part of the layout: changing it
    # on such a tier is a layout change (refused unless wipe_incompatible).
    min_regions: Positive = 128
    # O_DIRECT: "auto" uses it where the filesystem supports it, "on" fails if it does not, "off" never.
    direct_io: DirectIO = "auto"
    # "back": host evictions are demoted to disk. "through": every put is also written to disk.
    write_mode: WriteMode = "back"
    # Admission to disk: "adaptive", "admit_all" or "reject_first".
    admission: str = "adaptive"
    # Bytes per second the tier may write on average (0: no budget).
    write_budget_bytes_per_s: Size = 0
    # The same budget in drive writes per day: this many times drive_bytes a day (0: none). At most one of
    # the two budgets may be set.
    write_budget_dwpd: float = 0.0
    # Bytes of the drive(s) the DWPD budget is stated against, as the drive's rating counts them (0: the
    # tier's own files, capacity_bytes x len(paths); a tier on part of a drive wears the whole drive).
    drive_bytes: Size = 0
    # Seconds of budget the tier may save up and spend at once: the budget accrues over time, so a quiet
    # hour pays for a burst, and the average over a day is still the budget.
    write_budget_burst_s: float = 3600.0
    # Bytes of region buffers that hold demoted blocks until the drive has written them (at least three
    # regions): a burst of demotions up to this size is written, not dropped, while the drive catches up.
    # Only three regions are allocated at open; the rest on the first burst that needs them.
    writeback_buffer_bytes: PositiveSize = 1 * GiB
    # A block read this many times since it was written is re-appended when its region is evicted. One read
    # (CLOCK's second chance) beat two in 7 of 10 replay cells, by up to 1.4 points (docs/policy.md).
    reinsert_hits: int = 1
    # Per-entry compression: "none" or "zstd" (with a byte-plane split of 16-bit values).
    codec: Codec = "none"
    # Threads that issue disk reads and writes.
    io_threads: Positive = 4
    # Wipe a directory of another format version or layout instead of refusing to open it.
    wipe_incompatible: bool = False
    # Bytes of address space LMDB may map for the index (its file grows on use up to this); 0 sizes it from
    # the capacity (256 bytes per 4 KiB page, at least 64 MiB, several times what the entries need). An
    # index that reaches it refuses new blocks (DiskFullError, disk_full_errors) until evictions make room.
    index_map_bytes: Size = 0

    def __post_init__(self) -> None:
        check_fields(self, "disk")
        if self.region_bytes % (4 * KiB):
            raise ConfigError(f"disk.region_bytes must be a multiple of 4 KiB, got {self.region_bytes}")
        if self.capacity_bytes < self.region_bytes:
            raise ConfigError("disk.capacity_bytes must hold at least one region")
        if 0 < self.index_map_bytes < 64 * KiB:
            raise ConfigError(f"disk.index_map_bytes must be 0 (sized from the capacity) or at least 64KiB, got "
                              f"{self.index_map_bytes}")
        if self.write_budget_dwpd and self.write_budget_bytes_per_s:
            raise ConfigError("set at most one of disk.write_budget_bytes_per_s and disk.write_budget_dwpd")
        if self.admission not in ("adaptive", "admit_all", "reject_first"):
            raise ConfigError(f"disk.admission must be adaptive, admit_all or reject_first, got {self.admission!r}")

    @property
    def budget_bytes_per_s(self) -> int:
        """The write budget in bytes per second, from whichever budget is set (0: none)."""
        if self.write_budget_dwpd:
            drive_bytes = self.drive_bytes or self.capacity_bytes * len(self.paths)
            return max(1, int(self.write_budget_dwpd * drive_bytes / 86_400))
        return self.write_budget_bytes_per_s

    def scaled_region_bytes(self, entry_bytes: int) -> int:
        """The region size a tier of ``len(paths)`` files uses: ``region_bytes``, or less (a multiple of 4 KiB,
        at least ``entry_bytes``, never more than ``region_bytes``) so that it has ``min_regions`` regions."""
        per_path = -(-self.min_regions // max(1, len(self.paths)))
        fitted = self.capacity_bytes // per_path // (4 * KiB) * (4 * KiB)
        return min(self.region_bytes, max(entry_bytes, fitted))

    @property
    def writeback_regions(self) -> int:
        """Region buffers of the write-back buffer: ``writeback_buffer_bytes`` in whole regions, at least 3."""
        return max(3, self.writeback_buffer_bytes // self.region_bytes)


@dataclass(frozen=True)
class RemoteConfig:
    # Redis-protocol servers (Redis, Valkey, managed services): "redis://[user:password@]host:port[/db]", or
    # "rediss://..." for TLS. Empty: no remote tier. In cluster mode, any nodes of the cluster (seeds).
    urls: tuple[str, ...] = ()
    # "single": one server (the first URL). "cluster": Redis Cluster, keys spread over the nodes by slot.
    mode: RemoteMode = "single"
    # ACL user and password; they override those in the URLs. Empty: none (or the URL's).
    username: str = ""
    password: str = field(default="", repr=False)
    # TLS (also implied by a "rediss://" URL): CA bundle, client certificate and key (mutual TLS), checking.
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_verify: bool = True
    # Bound on establishing a connection, and on every reply (a lookup waits at most about this long).
    connect_timeout_ms: Positive = 500
    timeout_ms: Positive = 1000
    # After a failure, reconnects are tried after reconnect_min_ms, doubling up to reconnect_max_ms.
    reconnect_min_ms: Positive = 100
    reconnect_max_ms: Positive = 5000
    # Server keys are "<key_prefix>:<layout fingerprint>:<block key in hex>"; the block key itself covers
    # the model, shard and tenant salt (kvtier.keys), the fingerprint the layout.
    key_prefix: str = "kvtier"
    # Seconds a value lives on the server (0: until the server evicts it: set maxmemory and allkeys-lru).
    ttl_s: int = 0
    # "through": every new block is sent when it is committed (other hosts can hit it at once), host
    # evictions too if not sent yet. "back": only host evictions are sent.
    write_mode: WriteMode = "through"
    # Bytes of blocks waiting to be sent; an offer beyond it is dropped and counted (never waited for).
    queue_bytes: PositiveSize = 256 * MiB
    # Bytes of values in one write or read pipeline.
    batch_bytes: PositiveSize = 32 * MiB
    # Per-value compression, "none" or "zstd" (as the disk tier's codec); reads decode either.
    codec: Codec = "none"
    # Threads reading values into host slots (each with its own connection).
    read_threads: Positive = 2
    # Shared secret (at least 16 characters) of the hosts that trust each other: every value then carries a
    # keyed BLAKE3 tag over header and payload, and a value without a valid tag is a miss. Empty: no tags
    # (anyone who can write to the servers can plant a value; see docs/remote.md, "Trust").
    auth_secret: str = field(default="", repr=False)
    # With auth_secret: server keys name the block by a keyed hash of its key (no block key listed).
    hash_key_names: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "remote")
        for url in self.urls:
            if not url.startswith(("redis://", "rediss://", "valkey://", "valkeys://", "unix://")):
                # Only the scheme is echoed: the URL may hold a password.
                scheme = url.split("://")[0][:16] + "://" if "://" in url else "no scheme"
                raise ConfigError(f"remote.urls: a URL with {scheme!r} is not a redis://, rediss://, valkey:// or "
                                  "unix:// URL")
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ConfigError("remote.reconnect_max_ms must be at least remote.reconnect_min_ms")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(f"remote.key_prefix must be a non-empty word, got {self.key_prefix!r}")
        unix = [url for url in self.urls if url.startswith("unix://")]
        if unix and self.mode == "cluster":
            raise ConfigError("remote.mode = 'cluster' needs TCP URLs of cluster nodes, not unix:// sockets")
        if unix and self.tls:
            raise ConfigError("remote.tls is set but a unix:// socket cannot carry TLS")
        if self.auth_secret and len(self.auth_secret) < 16:
            raise ConfigError("remote.auth_secret must be at least 16 characters (or empty: no value tags)")
        if self.hash_key_names and not self.auth_secret:
            raise ConfigError("remote.hash_key_names needs remote.auth_secret (the key names are keyed by it)")


@dataclass(frozen=True)
class TransferConfig:
    # "auto" picks CUDA when torch sees a GPU, else the CPU backend.
    backend: TransferBackend = "auto"
    # CPU backend: worker threads serving copy jobs.
    num_workers: Positive = 2
    # CUDA backend: streams for loads and for stores (loads get the higher priority).
    num_streams: Positive = 2

    def __post_init__(self) -> None:
        check_fields(self, "transfer")


@dataclass(frozen=True)
class DaemonConfig:
    # Unix socket of the daemon; empty: "kvtier.sock" in the user's runtime directory.
    socket_path: str = ""
    # Group allowed to connect (socket mode 0660); empty: owner only (mode 0600).
    socket_group: str = ""
    # TCP listener for remote clients; 0 disables it. Bound to tcp_host (loopback unless configured).
    tcp_port: Port = 0
    tcp_host: str = "127.0.0.1"
    # Shared token remote clients must present; required when tcp_port is set.
    tcp_token: str = ""
    # Prometheus /metrics port on loopback; 0 disables it.
    metrics_port: Port = 9464
    # Largest control or payload frame accepted, in bytes (at least 64 KiB, the most a hello may take).
    max_frame_bytes: Annotated[int, SIZE, Range(64 * KiB)] = 256 * MiB
    # The one KV layout the daemon serves (a table of KVLayout fields, [daemon.layout] in TOML); unset: the
    # layout of the first client's hello.
    layout: KVLayout | None = None
    # Bytes of the daemon's host pool; 0: half the available RAM (and of free /dev/shm), at most pool_cap_bytes.
    pool_bytes: Size = 0
    pool_cap_bytes: PositiveSize = 32 * GiB
    # With [disk] paths empty, the daemon keeps a disk tier in the user's data directory; false: no disk tier.
    default_disk: bool = True
    # The longest a client waits on one socket operation with the daemon (a stalled daemon is then a
    # ProtocolError and the connection is reopened); above an acquire's longest wait for promotions.
    request_timeout_ms: Positive = 60_000
    # After a reply that ends a Unix connection (a protocol violation, an internal error), the longest the
    # daemon keeps that connection's reserved and leased slots while its client, still running, has not closed
    # it: a copy the client started into or out of them may still be running, and a slot handed to another
    # writer meanwhile would be overwritten (or read) by it. A client closes the connection once its copies
    # are done; one that outlives this has broken its own deadlines. 0: free them at once.
    hold_after_error_s: float = 300.0
    # Clients (kvtier.daemon.open_store): "" opens an embedded store; "unix" (the default socket),
    # "unix:/path/to.sock" or "tcp://host:port" connects to a daemon.
    connect: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "daemon")
        if self.tcp_port and not self.tcp_token:
            raise ConfigError("daemon.tcp_token is required when daemon.tcp_port is set")
        if self.connect and not (self.connect == "unix" or self.connect.startswith(("unix:", "tcp://"))):
            raise ConfigError(f"daemon.connect must be '', 'unix', 'unix:PATH' or 'tcp://HOST:PORT', "
                              f"got {self.connect!r}")


@dataclass(frozen=True)
class StoreConfig:
    host: HostConfig = field(default_factory=HostConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    # Block-key hash: "sha256" (default), "blake3", or "xxh3_128" (trusted single-tenant use only).
    hash_algo: str = "sha256"

    def __post_init__(self) -> None:
        check_fields(self, "")
        from kvtier.keys import HASH_ALGOS

        if self.hash_algo not in HASH_ALGOS:
            raise ConfigError(f"hash_algo must be one of {HASH_ALGOS}, got {self.hash_algo!r}")


_SECTIONS: dict[str, type[Any]] = {
    "host": HostConfig, "disk": DiskConfig, "remote": RemoteConfig, "transfer": TransferConfig, "daemon": DaemonConfig,
}


def config_from_mapping(data: Mapping[str, Any]) -> StoreConfig:
    """A ``StoreConfig`` from nested dicts shaped like the TOML file; ``ConfigError`` on anything unknown."""
    sections: dict[str, Any] = {}
    top: dict[str, Any] = {}
    top_fields = {"hash_algo"}
    for name, value in data.items():
        if name in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{name}] must be a table")
            known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
            unknown = set(value) - known
            if unknown:
                raise ConfigError(f"unknown setting(s) in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
            try:
                sections[name] = _SECTIONS[name](**value)
            except TypeError as exc:
                raise ConfigError(f"[{name}]: {exc}") from exc
        elif name in top_fields:
            top[name] = value
        else:
            raise ConfigError(f"unknown configuration section or key {name!r}")
    return StoreConfig(**sections, **top)


def load_config(path: str | Path | None = None, overrides: Mapping[str, str] | None = None) -> StoreConfig:
    """Defaults, then the TOML file at ``path`` (if given), then ``section.field=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for dotted, text in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if not name:
            data[section] = text_value(text, field_hint(StoreConfig, section))
        else:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"cannot override {dotted}: {section} is not a table")
            section_class = _SECTIONS.get(section)
            table[name] = text_value(text, None if section_class is None else field_hint(section_class, name))
    return config_from_mapping(data)
