"""The remote tier: blocks shared by every host through a Redis-protocol store (Redis, Redis Cluster,
Valkey, managed services), so that a prefix computed on one host is restored on another.

Server keys are ``<key_prefix>:<layout fingerprint>:<block key in hex>`` (with ``hash_key_names``, a keyed
hash of the block key instead); values are the disk tier's entry format (``kvtier.tiers.values``), tagged
with ``auth_secret``. Capacity and eviction belong to the server (``maxmemory`` with ``allkeys-lru``, or
``ttl_s``): a value that is gone is a miss. The nodes, their health and their routing are
``kvtier.tiers.nodes``'s.

Threads: one writer and ``read_threads`` readers, each draining its queue in batches of at most
``batch_bytes`` (reads: 8 MiB), one pipeline per node a batch touches, every node at once; and one reviver,
which pings the down nodes and watches the up ones, so a hung node's PING never holds up the writes to
the others.

Promises:
- ``locate`` is one pipeline of EXISTS per node, all nodes at once, bounded by ``timeout_ms``.
- ``offer`` copies the block (or borrows it) and queues it; it never waits on the network. A block is
  dropped and counted instead of waiting: the queue holds ``queue_bytes`` at most, and nothing is queued for
  a node that is down. A key already held (written or seen by this host, since its node last may have lost
  values) or already queued is not sent again.
- ``submit_read`` resolves ``True`` only with a verified value of that key and block size in ``dst``; a
  missing, corrupt, truncated, forged or foreign value, an error reply or a fault resolves ``False`` and is
  counted. Every future resolves: a reader never dies of a value, and a fault fails what waits.
- A read receives at most one value's bytes, whatever the server holds. A bad value read (corrupt,
  forged, foreign, or not a string) is deleted from the server, so that lookups stop counting it and a good
  copy can be sent again.
- A node's fault (refused or dropped connection, timeout, hung server) stops only that node's keys: they
  are misses and refused offers at once while the other nodes serve on (``kvtier.tiers.nodes``). Error
  replies (OOM of a full server, a refused command) are counted per value and stop nothing.
- ``flush`` waits while the writer makes progress; ``close`` sends what is queued (at most ``timeout_ms``
  more), then stops the threads (a batch in flight ends within its timeout; the reads still queued are
  misses); ``stats`` still answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import MappingProxyType
from typing import Any, Literal

import blake3
import torch
from redis.exceptions import OutOfMemoryError, ResponseError

from kvtier.config import RemoteConfig
from kvtier.disk.codec import ZstdCodec
from kvtier.disk.device import tensor_view
from kvtier.disk.format import HEADER_BYTES
from kvtier.errors import ClosedError, ConfigError, FlushTimeoutError, InvalidInputError
from kvtier.keys import check_key
from kvtier.layout import KVLayout
from kvtier.stats import TierStats
from kvtier.tiers.base import WriteMode
from kvtier.tiers.nodes import NodeDown, Nodes
from kvtier.tiers.redis_client import RequestCounter
from kvtier.tiers.values import TAG_BYTES, SplitValue, new_value, read_value, seal, seal_borrowed, tag_key

_LOG = logging.getLogger(__name__)
# Keys this host wrote or saw present, so that they are not sent again; bounded, oldest forgotten first.
_KNOWN_KEYS = 1 << 18
# After an unexpected error in the reviver, it tries again this much later.
_REVIVE_RETRY_S = 1.0
_COUNTERS = ("lookups", "lookup_keys", "lookup_found", "hits", "misses", "checksum_failures", "foreign_values",
             "forged_values", "bad_values_deleted", "read_errors", "blocks_written", "bytes_written", "bytes_read",
             "offers_deduplicated", "queue_full_dropped", "down_dropped", "dropped_blocks", "write_errors",
             "oom_errors")
_BAD = {"corrupt": "checksum_failures", "foreign": "foreign_values", "forged": "forged_values"}
# Bytes of values in one read pipeline (at most batch_bytes): a reader verifies and copies its batch while the
# other receives theirs, and small batches keep both busy. 2 MiB blocks, one server, against raw pipelined GETs
# of 15 values: 4 a pipeline 1.05-1.7x, 8 0.9x, 15 0.8-0.88x (measured here, like phases back to back).
_READ_BATCH_BYTES = 8 << 20


class _Write:
    """A queued block: a copy (``value``, header room first) or a borrowed payload and its ``release``."""

    __slots__ = ("borrowed", "key", "release", "value")

    def __init__(self, key: bytes, value: bytearray | None, borrowed: memoryview | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.key, self.value, self.borrowed, self.release = key, value, borrowed, release


def _released(writes: Sequence[_Write]) -> None:
    for write in writes:
        if write.release is not None:
            write.release()


class _Read:
    __slots__ = ("dst", "future", "key")

    def __init__(self, key: bytes, dst: memoryview, future: Future[bool]) -> None:
        self.key, self.dst, self.future = key, dst, future


def _resolve(reads: Sequence[_Read], outcomes: Sequence[bool] | None = None) -> None:
    """Resolve each read's future (``False`` where no outcome), once."""
    for i, read in enumerate(reads):
        if not read.future.done():
            read.future.set_result(bool(outcomes[i]) if outcomes is not None else False)


class RemoteTier:
    """A ``LowerTier`` over a Redis-protocol store. See the module docstring for the promises."""

    name = "remote"
    local = False

    def __init__(self, config: RemoteConfig, layout: KVLayout) -> None:
        if not config.urls:
            raise ConfigError("remote.urls is empty: the remote tier needs at least one server URL")
        self.config, self.layout = config, layout
        self.block_bytes = layout.block_bytes
        self.write_mode: WriteMode = config.write_mode
        self._prefix = f"{config.key_prefix}:{layout.fingerprint}:".encode()
        self._mac_key = tag_key(config.auth_secret, "value tag") if config.auth_secret else None
        self._name_key = tag_key(config.auth_secret, "key name") if config.hash_key_names else None
        self._tag_bytes = TAG_BYTES if self._mac_key else 0
        self._zstd = ZstdCodec(layout.torch_dtype.itemsize)
        self._codec = self._zstd if config.codec == "zstd" else None
        self._value_bytes = HEADER_BYTES + self.block_bytes + self._tag_bytes
        self._batch_values = max(1, config.batch_bytes // self._value_bytes)
        self._read_batch = max(1, min(config.batch_bytes, _READ_BATCH_BYTES) // self._value_bytes)
        self._wait_s = (config.timeout_ms + config.connect_timeout_ms) / 1000
        self.requests = RequestCounter()
        self._nodes = Nodes(config, self.requests)  # a ConfigError here (TLS files, URLs) dials nothing
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        # key -> when it was written or seen; valid while the nodes' generation is ``_known_generation``.
        self._known: dict[bytes, float] = {}
        self._known_generation = 0
        self._queued: deque[_Write] = deque()
        self._queued_keys: set[bytes] = set()
        self._queued_bytes = 0
        self._writing = 0
        self._progress_at = time.monotonic()
        # Value buffers of sent blocks, reused: a fresh 2 MiB buffer costs its zeroing and page faults too
        # (1.5 ms against 0.5 ms for the copy alone, measured here).
        self._spare: list[bytearray] = []
        self._reads: deque[_Read] = deque()
        self._closed = False
        self._nodes.start()
        self._revive_at = 0.0
        self._threads = [threading.Thread(target=self._write_loop, name="kvtier-remote-writer", daemon=True),
                         threading.Thread(target=self._revive_loop, name="kvtier-remote-reviver", daemon=True)]
        self._threads += [threading.Thread(target=self._read_loop, name=f"kvtier-remote-reader-{i}", daemon=True)
                          for i in range(config.read_threads)]
        for thread in self._threads:
            thread.start()

    # -- the lower-tier interface ---------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether any node serves."""
        return self._nodes.up

    def server_key(self, key: bytes) -> bytes:
        if self._name_key is not None:
            return self._prefix + blake3.blake3(key, key=self._name_key).hexdigest(16).encode()
        return self._prefix + key.hex().encode()

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return self._up_locked() and (self._known_locked(key) or key in self._queued_keys)

    def locate(self, keys: Sequence[bytes]) -> list[bool]:
        """Which ``keys`` the servers hold: one pipeline of EXISTS per node (a miss where its node is down)."""
        with self._lock:
            self._check_open()
        if not keys or not self._nodes.up:
            return [False] * len(keys)
        replies = self._nodes.execute([("EXISTS", self.server_key(key)) for key in keys], "lookup")
        found = [reply == 1 for reply in replies]
        now = time.monotonic()
        with self._lock:
            self._counters["lookups"] += 1
            self._counters["lookup_keys"] += len(keys)
            self._counters["lookup_found"] += sum(found)
            self._sync_known_locked()
            for key, hit in zip(keys, found, strict=True):
                if hit:
                    self._remember_locked(key, now)
                else:
                    self._known.pop(key, None)
        return found

    def offer(self, key: bytes, payload: torch.Tensor, *, wait: bool = False,
              release: Callable[[], None] | None = None) -> bool:
        """Queue ``payload`` (a contiguous uint8 CPU tensor of ``block_bytes``) to be sent; never waits.

        Without ``release`` the block is copied before this returns. With it, the payload is borrowed: it
        must stay unchanged until ``release()``, which the tier calls exactly once, from this call (block
        not kept) or from its writer thread once the block was sent or dropped. It saves the copy on the
        caller's thread (the store pins the block's host slot meanwhile).
        """
        check_key(key)
        if (not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.device.type != "cpu"
                or payload.numel() != self.block_bytes or not payload.is_contiguous()):
            if release is not None:
                release()
            raise InvalidInputError(f"a remote payload must be a contiguous uint8 CPU tensor of {self.block_bytes} "
                                    "bytes")
        spare: bytearray | None = None
        serves = self._nodes.serves(self.server_key(key))
        with self._lock:
            try:
                outcome = self._admit_locked(key, serves)
            except ClosedError:
                if release is not None:
                    release()
                raise
            if outcome == "reserved" and release is None:
                spare = self._spare.pop() if self._spare else None
        if outcome != "reserved":
            if release is not None:
                release()
            return outcome == "held"
        write = (_Write(key, new_value(payload, spare, self._tag_bytes)) if release is None
                 else _Write(key, None, tensor_view(payload), release))
        with self._lock:
            self._queued.append(write)
            self._cond.notify_all()
        return True

    def _admit_locked(self, key: bytes, serves: bool) -> Literal["held", "reserved", "refused"]:
        """``held`` (sent or queued already), ``reserved`` (room taken in the queue: the caller queues it)
        or ``refused`` (its node is down, or the queue is full; counted)."""
        self._check_open()
        self._sync_known_locked()
        if self._known_locked(key) or key in self._queued_keys:
            self._counters["offers_deduplicated"] += 1
            return "held"
        if not serves:
            self._counters["down_dropped"] += 1
            return "refused"
        if self._queued_bytes + self._value_bytes > self.config.queue_bytes:
            self._counters["queue_full_dropped"] += 1
            return "refused"
        self._queued_bytes += self._value_bytes
        self._queued_keys.add(key)
        return "reserved"

    def submit_read(self, key: bytes, dst: torch.Tensor) -> Future[bool]:
        """Read ``key`` into ``dst`` (a contiguous uint8 CPU tensor of at least ``block_bytes``) on a reader."""
        check_key(key)
        if (not isinstance(dst, torch.Tensor) or dst.dtype != torch.uint8 or dst.device.type != "cpu"
                or not dst.is_contiguous() or dst.numel() < self.block_bytes):
            raise InvalidInputError(f"a remote read needs a contiguous uint8 CPU tensor of at least "
                                    f"{self.block_bytes} bytes")
        future: Future[bool] = Future()
        serves = self._nodes.serves(self.server_key(key))
        with self._lock:
            self._check_open()
            if serves:
                self._reads.append(_Read(key, tensor_view(dst)[: self.block_bytes], future))
                self._cond.notify_all()
            else:
                self._counters["misses"] += 1
        if not serves:
            # Resolved outside the lock: a done-callback may call back into the store, which calls us.
            future.set_result(False)
        return future

    def on_access(self, keys: Sequence[bytes], hit_flags: Sequence[bool]) -> None:
        """Nothing to learn: what stays on the server is the server's eviction policy's choice."""

    def flush(self, deadline: float | None = None) -> None:
        """Wait until every queued block was sent or dropped, or the writer made no progress for a timeout
        (a batch takes at most ``timeout_ms`` + ``connect_timeout_ms``: the writer is then stuck); past
        ``deadline`` (``time.monotonic``, if given) ``FlushTimeoutError``, the queue going on."""
        with self._lock:
            while (self._queued or self._writing) and not self._closed:
                now = time.monotonic()
                if now - self._progress_at > 2 * self._wait_s + 1:
                    return
                if deadline is not None and now >= deadline:
                    raise FlushTimeoutError(f"the remote tier still had {self._queued} block(s) queued at the "
                                            "flush's deadline")
                self._cond.wait(0.1 if deadline is None else min(0.1, deadline - now))

    def stats(self, hit_blocks: int) -> TierStats:
        nodes = self._nodes.counts()
        with self._lock:
            self._sync_known_locked()
            c = dict(self._counters)
            detail: dict[str, int | float | bool | str] = {
                **c, **nodes, "up": self._nodes.up, "mode": self.config.mode,
                "requests_sent": self.requests.sent, "queued_bytes": self._queued_bytes,
                "queued_blocks": len(self._queued) + self._writing, "known_blocks": len(self._known),
                "authenticated": self._mac_key is not None}
            # What the servers hold is theirs to know (and to evict): no capacity or use is claimed here.
            return TierStats(name="remote", capacity_blocks=0, used_blocks=0, hit_blocks=hit_blocks,
                             evicted_blocks=0, bytes_read=c["bytes_read"], bytes_written=c["bytes_written"],
                             detail=MappingProxyType(detail))

    def close(self) -> None:
        """Send what is queued (while the servers answer, at most ``timeout_ms`` more), stop, disconnect."""
        with self._lock:
            if self._closed:
                return
        deadline = time.monotonic() + self.config.timeout_ms / 1000
        with self._lock:
            while (self._queued or self._writing) and self._nodes.up and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        with self._lock:
            writes, reads = list(self._queued), list(self._reads)
            self._counters["dropped_blocks"] += len(writes)
            self._counters["misses"] += len(reads)
            self._queued.clear()
            self._reads.clear()
            self._queued_keys.clear()
            self._queued_bytes = 0
        _released(writes)
        _resolve(reads)
        self._nodes.close()

    # -- what this host knows the servers hold ----------------------------------------------------------

    def _up_locked(self) -> bool:
        return self._nodes.up

    def _sync_known_locked(self) -> None:
        """Forget every known key once a node may have lost values (it came back, restarted, evicted)."""
        if self._nodes.generation != self._known_generation:
            self._known.clear()
            self._known_generation = self._nodes.generation

    def _known_locked(self, key: bytes) -> bool:
        self._sync_known_locked()
        since = self._known.get(key)
        if since is None:
            return False
        if self.config.ttl_s and time.monotonic() - since >= self.config.ttl_s:
            del self._known[key]  # expired on the server by now
            return False
        return True

    def _remember_locked(self, key: bytes, now: float) -> None:
        self._known[key] = now
        if len(self._known) > _KNOWN_KEYS:
            del self._known[next(iter(self._known))]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the remote tier is closed")

    # -- writer ---------------------------------------------------------------------------------------

    def _revive_loop(self) -> None:
        """Ping the down nodes when their backoff expires and watch the up ones (``NodeSet.revive``)."""
        while True:
            with self._lock:
                while not self._closed and time.monotonic() < self._revive_at:
                    self._cond.wait(max(0.0, self._revive_at - time.monotonic()))
                if self._closed:
                    return
            try:
                revive_at = self._nodes.revive()
            except Exception:  # never let the reviver die: the down nodes would never come back
                _LOG.exception("remote tier reviver: unexpected error; retrying in %.1f s", _REVIVE_RETRY_S)
                revive_at = time.monotonic() + _REVIVE_RETRY_S
            with self._lock:
                self._revive_at = revive_at

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._queued:
                    self._cond.wait()
                if self._closed:
                    return
                batch = [self._queued.popleft() for _ in range(min(len(self._queued), self._batch_values))]
                self._writing = len(batch)
            try:
                self._write(batch)
            except Exception:  # never let the writer die: what it held is dropped and counted
                _LOG.exception("remote tier writer: unexpected error; %d blocks dropped", len(batch))
                with self._lock:
                    self._counters["dropped_blocks"] += len(batch)
                    self._finish_writes_locked(batch)
                _released(batch)
            finally:
                with self._lock:
                    self._writing = 0
                    self._progress_at = time.monotonic()
                    self._cond.notify_all()

    def _finish_writes_locked(self, batch: Sequence[_Write]) -> None:
        for write in batch:
            self._queued_keys.discard(write.key)
        self._queued_bytes = max(0, self._queued_bytes - len(batch) * self._value_bytes)

    def _write(self, batch: list[_Write]) -> None:
        ttl = ("PX", self.config.ttl_s * 1000) if self.config.ttl_s else ()
        commands: list[tuple[Any, ...]] = []
        sizes = []
        for write in batch:
            sealed: SplitValue | bytes | bytearray
            if write.borrowed is not None:
                sealed = seal_borrowed(write.key, write.borrowed, self._codec, self._mac_key)
            else:
                assert write.value is not None
                # Framed as a split value too: the packer would otherwise copy the whole value once more.
                sealed = SplitValue(b"", memoryview(seal(write.key, write.value, self._codec, self._mac_key)))
            sizes.append(len(sealed))
            commands.append(("SET", self.server_key(write.key), sealed, *ttl))
        replies = self._nodes.execute(commands, "write")
        now = time.monotonic()
        with self._lock:
            self._sync_known_locked()
            for write, size, reply in zip(batch, sizes, replies, strict=True):
                if reply is True:
                    self._remember_locked(write.key, now)
                    self._counters["blocks_written"] += 1
                    self._counters["bytes_written"] += size
                elif isinstance(reply, NodeDown):
                    self._counters["down_dropped"] += 1
                elif isinstance(reply, OutOfMemoryError):
                    self._counters["oom_errors"] += 1
                elif isinstance(reply, ResponseError):
                    self._counters["write_errors"] += 1
                else:
                    self._counters["dropped_blocks"] += 1
            self._finish_writes_locked(batch)
            room = 2 * self._batch_values - len(self._spare)
            self._spare.extend([write.value for write in batch if write.value is not None][: max(0, room)])
        _released(batch)  # before flush can return: what was lent is given back by then

    # -- readers --------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._reads:
                    self._cond.wait()
                if self._closed:
                    return  # ``close`` answers what is still queued as misses: reading it costs a round trip a batch
                batch = [self._reads.popleft() for _ in range(min(len(self._reads), self._read_batch))]
            try:
                self._read(batch)
            except Exception:  # never let a reader die: its futures would never resolve
                _LOG.exception("remote tier reader: unexpected error; %d reads failed", len(batch))
                with self._lock:
                    self._counters["read_errors"] += sum(not read.future.done() for read in batch)
                    self._counters["misses"] += sum(not read.future.done() for read in batch)
                _resolve(batch)

    def _read(self, batch: list[_Read]) -> None:
        # GETRANGE, not GET: a planted value of any size costs at most one value's bytes to receive (and one
        # more: a longer value cannot pass as a whole one). A missing key reads as empty.
        replies = self._nodes.execute([("GETRANGE", self.server_key(read.key), 0, self._value_bytes)
                                       for read in batch], "read")
        outcomes: list[str] = []
        for read, reply in zip(batch, replies, strict=True):
            if isinstance(reply, bytes) and reply:
                # A cut value fails its checks like any other (a length, the tag or the checksum).
                outcomes.append(read_value(reply, read.key, read.dst, self._zstd, self._mac_key))
            elif isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
                outcomes.append("foreign")  # a list, a hash...: not a value, and in the way of one
            else:
                outcomes.append("missing" if isinstance(reply, bytes) else "error")
        bad = [read.key for read, outcome in zip(batch, outcomes, strict=True) if outcome in _BAD]
        with self._lock:
            for read, outcome in zip(batch, outcomes, strict=True):
                if outcome == "ok":
                    self._counters["hits"] += 1
                    self._counters["bytes_read"] += self.block_bytes
                    continue
                self._counters["misses"] += 1
                self._known.pop(read.key, None)
                if outcome in _BAD:
                    self._counters[_BAD[outcome]] += 1
                elif outcome == "error":
                    self._counters["read_errors"] += 1
        if bad:
            # Lookups would count a bad value as a hit and every read fail on it again: delete it before the
            # miss is reported (a good copy written meanwhile by another host goes with it: a miss, never
            # wrong bytes).
            deleted = self._nodes.execute([("DEL", self.server_key(key)) for key in bad], "delete")
            with self._lock:
                self._counters["bad_values_deleted"] += sum(reply == 1 for reply in deleted)
        _resolve(batch, [outcome == "ok" for outcome in outcomes])
