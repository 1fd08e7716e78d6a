"""``Client``: the embedded store's interface, served by a ``kvtier serve`` daemon.

Over the Unix socket the client maps the daemon's arena and copies blocks between its own tensors (CPU or
CUDA) and arena slots with its own transfer engine; only control frames cross the socket. Over TCP the
payloads travel in frames and the zero-copy calls are unavailable.

Promises:
- ``lookup``, ``contains``, ``put``, ``get``, ``epoch``, ``advance_epoch``, ``removed_since``, ``stats``,
  ``flush``, ``hasher``,
  ``close``, the context manager
  and (Unix only) ``reserve`` / ``commit`` / ``abort`` / ``acquire`` / ``release`` / ``slot_view`` behave as
  the embedded ``Store``'s, with these differences: a put that finds no room fails all of its blocks (the
  daemon reserves all or nothing), and a get fails only the indices that are missing.
- Arguments are checked here, before anything is sent: ``InvalidInputError`` as in the store.
- Error replies raise ``CapacityError``, ``InvalidInputError``, ``LayoutMismatchError``, ``AuthError``,
  ``ConfigError``, ``ProtocolError`` or ``DiskError`` (and its subclasses) where the daemon raised that class, else
  ``ServerError(kind, message)``. A daemon that goes away raises
  ``ProtocolError`` in calls and fails the blocks of running jobs; a closed client raises ``ClosedError``.
- A broken connection is reopened by a later call, with exponential backoff between attempts
  (``RECONNECT_MIN_S`` doubling up to ``RECONNECT_MAX_S``; a call inside the wait raises ``ProtocolError``
  at once, without touching the socket). A restarted daemon's new arena is mapped (and pinned) anew; an
  old mapping stays mapped while a copy or a handle of it is outstanding, and is unmapped after the last.
- Every lease and reservation names its ``generation``: the arena and the connection it came from. A call
  that straddles a reconnect (a daemon restart, a broken connection) never resolves its slots in another
  arena: ``slot_rows(handle)`` / ``slot_view(slot, handle)`` and ``commit`` of a handle whose connection is
  gone raise ``StaleHandleError``, its ``release`` / ``abort`` do nothing (the daemon dropped them with the
  connection), a put whose commit cannot reach the same connection fails its blocks, and a get whose lease
  cannot be released on the same connection fails its blocks (the lease may have lapsed during the copy).
- A replaced connection (broken by a timeout or by an error reply that ends it, ``ProtocolError`` or
  ``InternalError``; reopened) stays open until no copy or handle of it is outstanding
  (``parked_connections``): the daemon frees a connection's reserved and leased slots when it closes, and a
  put still copying into a freed slot would overwrite another writer's committed block.
- ``slot_rows()`` is the mapped arena as ``(num_slots, slot_bytes)`` uint8 rows (Unix only). With
  ``host.pin`` set, the mapping is registered with CUDA in this process, on the device of its first copy
  to or from a GPU (``pin_for``; the daemon itself never registers it nor makes a CUDA context).
- A block is committed only after its bytes were fully copied into its slot; a failed copy is aborted.
- Every method is safe to call from several threads (requests are serialized on the one connection).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvtier.arena import HostArena
from kvtier.config import StoreConfig
from kvtier.daemon.protocol import VERSION, Message, default_socket_path, pack, read_frame, stats_from_dict
from kvtier.epochs import check_scope
from kvtier.errors import (
    AuthError,
    CapacityError,
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
    KvtierError,
    LayoutMismatchError,
    ProtocolError,
    ServerError,
    StaleHandleError,
)
from kvtier.job import Job
from kvtier.keys import BlockHasher, HashAlgo, Namespace, check_key, check_keys
from kvtier.layout import KVLayout
from kvtier.removals import Removals
from kvtier.stats import StoreStats
from kvtier.store import FLUSH_WAIT_S, Handle, Lease, LookupResult, Reservation, Tier, as_bytes, check_keys_and_blocks
from kvtier.transfer import Direction, TransferEngine, make_transfer_engine, submit_or_fail

_ERRORS: dict[str, type[KvtierError]] = {cls.__name__: cls for cls in (
    AuthError, CapacityError, InvalidInputError, LayoutMismatchError, ConfigError, DiskError, DiskFullError,
    IndexFullError, IndexDamagedError, FormatVersionError, DirectoryLockedError, FlushTimeoutError, ProtocolError)}
# Error replies after which the daemon ends the connection (``kvtier.daemon.server``).
_CONNECTION_ENDED = frozenset({"ProtocolError", "InternalError"})
_TIERS = {tier.value: tier for tier in Tier}
# Room left in a payload frame for the msgpack envelope and the keys.
_FRAME_SLACK_BYTES = 64 * 1024
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 5.0
_CONNECTION_SERIALS = itertools.count(1)


def parse_address(address: str, config: StoreConfig) -> tuple[str, str | tuple[str, int]]:
    """``("unix", path)`` or ``("tcp", (host, port))`` from ``unix``, ``unix:PATH`` or ``tcp://HOST:PORT``."""
    if address == "unix":
        return "unix", config.daemon.socket_path or default_socket_path()
    if address.startswith("unix:"):
        return "unix", address[len("unix:"):]
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        if host and port.isdigit():
            return "tcp", (host.strip("[]"), int(port))
    raise ConfigError(f"a daemon address is 'unix', 'unix:PATH' or 'tcp://HOST:PORT', got {address!r}")


class Connection:
    """One connection to the daemon, greeted; ``call`` sends a request and returns its ok reply."""

    def __init__(self, address: str, config: StoreConfig, *, layout: KVLayout | None = None, namespace: str = "",
                 token: str | None = None, timeout: float | None = None) -> None:
        self.transport, target = parse_address(address, config)
        self.max_frame_bytes = config.daemon.max_frame_bytes
        family = socket.AF_UNIX if self.transport == "unix" else socket.AF_INET
        try:
            if isinstance(target, tuple):
                self._sock = socket.create_connection(target, timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self._sock = socket.socket(family, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(target)
        except OSError as exc:
            raise ProtocolError(f"cannot connect to the daemon at {target}: {exc}") from exc
        self._lock = threading.Lock()
        self._next_id = 0
        self._closed = False
        self._broken: str | None = None
        try:
            self.hello = self.call("hello", layout=None if layout is None else layout.to_dict(), namespace=namespace,
                                   token=token if token is not None else config.daemon.tcp_token)
        except BaseException:
            self.close()
            raise
        # Payload frames are cut to the smaller limit of the two sides, so the daemon never refuses one.
        self.max_frame_bytes = min(self.max_frame_bytes, int(self.hello["max_frame_bytes"]))
        # Leases and reservations live as long as this connection's session in the daemon: handles name both.
        self.arena_name: str | None = self.hello.get("arena")
        self.generation = f"{self.arena_name}#{next(_CONNECTION_SERIALS)}"

    def call(self, op: str, *, wait_s: float | None = None, **fields: Any) -> Message:
        """The ok reply to one request; an error reply raises (see the module promises).

        ``wait_s``: this request's deadline per socket operation, for a request the daemon may work on for
        longer than the connection's own (a flush).
        """
        with self._lock:
            # Broken first: a connection the client replaced is closed too, and a call that took it just before
            # is a broken connection (a miss), not a closed client.
            if self._broken is not None:
                raise ProtocolError(f"the connection to the daemon is broken: {self._broken}")
            if self._closed:
                raise ClosedError("the client is closed")
            self._next_id += 1
            request_id = self._next_id
            usual_s = self._sock.gettimeout()
            try:
                if wait_s is not None:
                    self._sock.settimeout(wait_s)
                self._sock.sendall(pack({"v": VERSION, "op": op, "id": request_id, **fields}))
                # Replies are sized by the requests we chunk; the slack covers keys and envelope.
                reply = read_frame(self._sock, self.max_frame_bytes + _FRAME_SLACK_BYTES)
            except (OSError, ProtocolError) as exc:
                self._broken = str(exc)
                raise ProtocolError(f"the connection to the daemon broke: {exc}") from exc
            finally:
                if wait_s is not None:
                    self._sock.settimeout(usual_s)
            if reply is None:
                self._broken = "closed by the daemon"
                raise ProtocolError("the daemon closed the connection")
        if reply.get("status") == "error":
            kind, message = str(reply.get("kind")), str(reply.get("message"))
            if kind in _CONNECTION_ENDED:
                # The daemon reads nothing more from this connection: the next call reopens one, and this one
                # is closed once nothing of its slots is outstanding (the daemon keeps them until then).
                self._broken = f"ended by the daemon: {kind}: {message}"
            cls = _ERRORS.get(kind)
            raise cls(message) if cls is not None else ServerError(kind, message)
        if reply["id"] != request_id:
            raise ProtocolError(f"reply {reply['id']} to request {request_id}")
        return reply

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._sock.close()


class Client:
    """A store for ``layout`` served by a daemon at ``address`` (default: ``config.daemon.connect`` or "unix")."""

    def __init__(self, layout: KVLayout, config: StoreConfig | None = None, *, address: str | None = None,
                 namespace: str = "", token: str | None = None, transfer: TransferEngine | None = None,
                 timeout: float | None = None) -> None:
        self.layout = layout
        self.config = config or StoreConfig()
        target = address or self.config.daemon.connect or "unix"
        # Every socket operation with the daemon ends within this: a stalled daemon is a ProtocolError.
        self.timeout_s = timeout if timeout is not None else self.config.daemon.request_timeout_ms / 1000

        def connect() -> Connection:
            return Connection(target, self.config, layout=layout, namespace=namespace, token=token,
                              timeout=self.timeout_s)

        self._connect = connect
        self._conn = self._connect()
        self._generations = {self._conn.generation}
        hello = self._conn.hello
        self.hash_algo: HashAlgo = hello["hash_algo"]
        self.slot_bytes: int = hello["slot_bytes"]
        self.remote = self._conn.transport == "tcp"
        self.arena: HostArena | None = None
        self._pin_devices: set[torch.device] = set()
        # Every arena mapped, by name, and the keys each has outstanding (held by a copy or a handle).
        self._arenas: dict[str, HostArena] = {}
        self._holds: dict[str, Counter[bytes]] = {}
        # The same holds by connection generation, and the replaced connections kept open for theirs.
        self._conn_holds: dict[str, Counter[bytes]] = {}
        self._parked: dict[str, Connection] = {}
        self._arena_lock = threading.Lock()
        self._reconnect_lock = threading.Lock()
        self._backoff_s = RECONNECT_MIN_S
        self._retry_at = 0.0
        self.reconnects = 0
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        try:
            if self.remote:
                # One worker keeps a remote client's jobs in submission order.
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-remote")
            else:
                self._map_arena(hello)
            self.transfer = transfer or make_transfer_engine(self.config.transfer)
        except BaseException:
            self._conn.close()
            raise

    def _map_arena(self, hello: Message) -> None:
        with self._arena_lock:
            if self.arena is not None and self.arena.name == hello["arena"]:
                return
            arena = HostArena(hello["num_slots"], hello["slot_bytes"], name=hello["arena"], create=False)
            # A new arena (a restarted daemon) is registered on the devices this client already copied with.
            for device in self._pin_devices:
                arena.start_pinning(self.config.host.pin_chunk_bytes, device)
            old, self.arena = self.arena, arena
            self._arenas[arena.name] = arena
            self._holds[arena.name] = Counter()
            if old is not None:
                self._unmap_if_unused(old.name)

    def _hold(self, conn: Connection, keys: Sequence[bytes]) -> HostArena:
        """The arena of ``conn``, held for ``keys`` until ``_drop``; ``StaleHandleError`` if it is unmapped."""
        with self._arena_lock:
            arena = self._arenas.get(conn.arena_name or "")
            if arena is None:
                raise StaleHandleError(f"the arena of connection {conn.generation} is no longer mapped")
            self._holds[arena.name].update(keys)
            self._conn_holds.setdefault(conn.generation, Counter()).update(keys)
            return arena

    def _drop(self, generation: str, keys: Sequence[bytes]) -> None:
        """End the holds of ``keys`` taken on connection ``generation`` (each at most once); close that connection
        if it was replaced and nothing of it is left; unmap a replaced arena left unused."""
        arena_name = generation.rpartition("#")[0]
        with self._arena_lock:
            for holds in (self._holds.get(arena_name), self._conn_holds.get(generation)):
                if holds is None:
                    continue
                for key in keys:
                    left = holds.pop(key, 0) - 1
                    if left > 0:
                        holds[key] = left
            if not self._conn_holds.get(generation, True):
                del self._conn_holds[generation]
            parked = self._parked.pop(generation, None) if generation not in self._conn_holds else None
            if arena_name in self._holds:
                self._unmap_if_unused(arena_name)
        if parked is not None:
            parked.close()

    def _retire(self, conn: Connection) -> None:
        """Close replaced ``conn`` now, or once the copies and handles of its slots are done (``_drop``)."""
        with self._arena_lock:
            if self._conn_holds.get(conn.generation):
                self._parked[conn.generation] = conn
                return
        conn.close()

    @property
    def parked_connections(self) -> int:
        """Replaced connections kept open until the copies into (or out of) their slots are done."""
        with self._arena_lock:
            return len(self._parked)

    def _unmap_if_unused(self, name: str) -> None:
        if (self.arena is not None and name == self.arena.name) or self._holds.get(name):
            return
        arena = self._arenas.pop(name, None)
        self._holds.pop(name, None)
        if arena is not None:
            arena.close()

    def _call(self, op: str, **fields: Any) -> Message:
        """``Connection.call`` on a live connection, reopened (with backoff) after the daemon went away."""
        return self._live().call(op, **fields)

    def _call_on(self, generation: str, op: str, **fields: Any) -> Message:
        """``Connection.call`` on the connection named ``generation``; ``StaleHandleError`` once it is replaced.

        A generation that is none of this client's (another client's handle) goes to the live connection,
        whose session in the daemon refuses what it did not reserve or lease.
        """
        if generation not in self._generations:
            return self._live().call(op, **fields)
        conn = self._conn
        if conn.generation != generation:
            raise StaleHandleError(f"a handle of connection {generation}, not of this client's live connection "
                                   f"{conn.generation} (the daemon restarted or the connection was reopened)")
        return conn.call(op, **fields)

    def _request_slots(self, op: str, keys: list[bytes], **fields: Any) -> tuple[Connection, HostArena, Message]:
        """``op`` on a live connection with its arena held for ``keys`` (the caller drops what it did not get)."""
        conn = self._live()
        arena = self._hold(conn, keys)
        try:
            return conn, arena, conn.call(op, keys=keys, **fields)
        except BaseException:
            self._drop(conn.generation, keys)
            raise

    def _live(self) -> Connection:
        conn = self._conn
        if not conn.broken:
            return conn
        with self._reconnect_lock:
            if self._closed:
                raise ClosedError("the client is closed")
            if not self._conn.broken:
                return self._conn
            now = time.monotonic()
            if now < self._retry_at:
                raise ProtocolError(f"the daemon is unreachable; next attempt in {self._retry_at - now:.2f} s")
            try:
                fresh = self._connect()
                try:
                    if fresh.hello["hash_algo"] != self.hash_algo or fresh.hello["slot_bytes"] != self.slot_bytes:
                        raise ProtocolError("the restarted daemon hashes or lays out blocks differently")
                    if not self.remote:
                        self._map_arena(fresh.hello)
                except BaseException:
                    # Not kept: a session in the daemon (and a socket here) per failed attempt otherwise.
                    fresh.close()
                    raise
            except KvtierError:
                self._retry_at = now + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, RECONNECT_MAX_S)
                raise
            self._retire(self._conn)
            self._generations.add(fresh.generation)
            self._conn, self._backoff_s, self._retry_at = fresh, RECONNECT_MIN_S, 0.0
            self.reconnects += 1
            return fresh

    # -- keys and lookups -----------------------------------------------------------------------------

    def hasher(self, model_id: str, tp_rank: int = 0, tp_size: int = 1, tenant_salt: str = "") -> BlockHasher:
        """A ``BlockHasher`` for this layout and the daemon's hash algorithm in the given namespace."""
        namespace = Namespace.for_layout(model_id, self.layout, tp_rank, tp_size, tenant_salt)
        return BlockHasher(namespace, self.layout.block_tokens, self.hash_algo)

    def lookup(self, keys: Sequence[bytes], *, prefetch: bool = True, scope: str | None = None) -> LookupResult:
        """The longest leading run of ``keys`` present in the daemon; disk hits are prefetched into host.

        With ``scope``, the same reply carries that scope's current key epoch (``LookupResult.epoch``).
        """
        fields: dict[str, Any] = {} if scope is None else {"scope": check_scope(scope)}
        reply = self._call("lookup", keys=check_keys(keys), prefetch=prefetch, **fields)
        return LookupResult(reply["num_blocks"], tuple(_TIERS[tier] for tier in reply["tiers"]), reply.get("epoch"))

    def epoch(self, scope: str) -> int:
        """The key epoch of ``scope`` in the daemon's store, shared by all its clients; see ``Store.epoch``."""
        epoch: int = self._call("epoch", scope=check_scope(scope))["epoch"]
        return epoch

    def advance_epoch(self, scope: str) -> int:
        """Advance ``scope``'s key epoch for every client of the daemon; see ``Store.advance_epoch``."""
        epoch: int = self._call("advance_epoch", scope=check_scope(scope))["epoch"]
        return epoch

    def removed_since(self, seq: int) -> Removals:
        """The daemon store's keys no tier holds any more, from ``seq`` on; see ``Store.removed_since``."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidInputError(f"'seq' must be a non-negative int, got {seq!r}")
        reply = self._call("removed_since", seq=seq)
        return Removals(reply["next_seq"], tuple(reply["keys"]), reply["overflowed"], reply["log_id"])

    def contains(self, key: bytes) -> Tier | None:
        tier = self._call("contains", keys=[check_key(key)])["tier"]
        return None if tier is None else Tier(tier)

    # -- put and get ------------------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> Job:
        """Copy ``blocks[i]`` into the daemon under ``keys[i]``, asynchronously; see ``Store.put``."""
        keys = self._check_blocks(keys, blocks)
        job = Job("put", len(keys), self.transfer.poll)
        if self._pool is not None:
            return self._remote(job, self._remote_put, keys, blocks)
        try:
            conn, arena, reply = self._request_slots("reserve", keys)
        except (CapacityError, StaleHandleError):
            job.fail(range(len(keys)))
            return job.seal()
        index = {key: i for i, key in enumerate(keys)}
        reserved: list[bytes] = reply["keys"]
        self._drop(conn.generation, reply["skipped"])
        if reserved:
            indices = [index[key] for key in reserved]
            self._pin_for_blocks(blocks)
            job.add_parts()
            # One submission for every block, as the embedded store does (one kernel launch on CUDA). The
            # slots are resolved in the arena of the connection that reserved them, never a newer one.
            submit_or_fail(self.transfer, arena.rows(), reply["slots"], [blocks[i] for i in indices],
                           Direction.STORE, self._finish_put(job, indices, reserved, conn))
        return job.seal()

    def _finish_put(self, job: Job, indices: list[int], keys: list[bytes],
                    conn: Connection) -> Callable[[BaseException | None], None]:
        def on_done(error: BaseException | None) -> None:
            failed: list[int] = []
            try:
                # Only the connection that reserved may commit: another one may hold the same keys for
                # another writer (a restarted daemon, a reopened connection).
                self._call_on(conn.generation, "commit" if error is None else "abort", keys=keys)
                if error is not None:
                    failed = indices
            except KvtierError:
                failed = indices
            finally:
                self._drop(conn.generation, keys)
            job.part_done(failed)

        return on_done

    def get(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> Job:
        """Copy the block stored under ``keys[i]`` into ``blocks[i]``, asynchronously; see ``Store.get``."""
        keys = self._check_blocks(keys, blocks)
        job = Job("get", len(keys), self.transfer.poll)
        if self._pool is not None:
            return self._remote(job, self._remote_get, keys, blocks)
        try:
            conn, arena, reply = self._request_slots("acquire", keys, prefix=False)
        except StaleHandleError:
            job.fail(range(len(keys)))
            return job.seal()
        slots: list[int | None] = reply["slots"]
        job.fail(i for i, slot in enumerate(slots) if slot is None)
        self._drop(conn.generation, [key for key, slot in zip(keys, slots, strict=True) if slot is None])
        leased = [(i, slot) for i, slot in enumerate(slots) if slot is not None]
        if leased:
            indices = [i for i, _ in leased]
            self._pin_for_blocks(blocks)
            job.add_parts()
            submit_or_fail(self.transfer, arena.rows(), [slot for _, slot in leased], [blocks[i] for i in indices],
                           Direction.LOAD, self._finish_get(job, indices, [keys[i] for i in indices], conn))
        return job.seal()

    def _finish_get(self, job: Job, indices: list[int], keys: list[bytes],
                    conn: Connection) -> Callable[[BaseException | None], None]:
        def on_done(error: BaseException | None) -> None:
            # A release on the leasing connection proves the daemon held the lease for the whole copy; if that
            # connection is gone the daemon dropped the lease, maybe mid-copy: the bytes are not trusted.
            released = True
            try:
                self._call_on(conn.generation, "release", keys=keys)
            except KvtierError:
                released = False
            finally:
                self._drop(conn.generation, keys)
            job.part_done(indices if error is not None or not released else ())

        return on_done

    # -- the TCP path: payloads in frames ---------------------------------------------------------------

    def _remote(self, job: Job, work: Callable[[list[bytes], Sequence[torch.Tensor]], list[int]],
                keys: list[bytes], blocks: Sequence[torch.Tensor]) -> Job:
        assert self._pool is not None
        job.add_parts()

        def run() -> None:
            try:
                failed = work(keys, blocks)
            except KvtierError:
                failed = list(range(len(keys)))
            job.part_done(failed)

        self._pool.submit(run)
        return job.seal()

    def _chunks(self, count: int) -> list[range]:
        per_frame = max(1, (self._conn.max_frame_bytes - _FRAME_SLACK_BYTES) // (self.layout.block_bytes + 32))
        return [range(start, min(count, start + per_frame)) for start in range(0, count, per_frame)]

    def _remote_put(self, keys: list[bytes], blocks: Sequence[torch.Tensor]) -> list[int]:
        failed: list[int] = []
        for chunk in self._chunks(len(keys)):
            data = [as_bytes(blocks[i]).cpu().numpy().tobytes() for i in chunk]
            try:
                self._call("put", keys=[keys[i] for i in chunk], data=data)
            except CapacityError:
                failed.extend(chunk)
        return failed

    def _remote_get(self, keys: list[bytes], blocks: Sequence[torch.Tensor]) -> list[int]:
        failed: list[int] = []
        for chunk in self._chunks(len(keys)):
            data = self._call("get", keys=[keys[i] for i in chunk])["data"]
            for i, payload in zip(chunk, data, strict=True):
                if payload is None:
                    failed.append(i)
                else:
                    as_bytes(blocks[i]).copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        return failed

    # -- zero-copy path (Unix socket only) --------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        """Reserve arena slots for the absent ``keys``; see ``Store.reserve``."""
        self._local_only("reserve")
        conn, _, reply = self._request_slots("reserve", check_keys(keys))
        self._drop(conn.generation, reply["skipped"])
        return Reservation(tuple(reply["keys"]), tuple(reply["slots"]), tuple(reply["skipped"]), conn.generation)

    def commit(self, reservation: Reservation) -> None:
        """Make the reserved blocks readable; ``StaleHandleError`` if the reserving connection is gone."""
        try:
            self._call_on(reservation.generation, "commit", keys=list(reservation.keys))
        finally:
            self._drop_handle(reservation)

    def abort(self, reservation: Reservation) -> None:
        """Drop the reserved slots; nothing to do (no error) if the reserving connection is gone."""
        try:
            self._call_on(reservation.generation, "abort", keys=list(reservation.keys))
        except StaleHandleError:
            return
        finally:
            self._drop_handle(reservation)

    def acquire(self, keys: Sequence[bytes], timeout: float | None = None) -> Lease:
        """Pin the longest leading run of readable ``keys`` (promoting disk blocks first); see ``Store.acquire``."""
        self._local_only("acquire")
        checked = check_keys(keys)
        conn, _, reply = self._request_slots("acquire", checked, prefix=True, timeout=timeout)
        self._drop(conn.generation, checked[len(reply["keys"]):])
        return Lease(tuple(reply["keys"]), tuple(slot for slot in reply["slots"] if slot is not None), conn.generation)

    def release(self, lease: Lease) -> None:
        """Unpin the leased blocks; nothing to do (no error) if the leasing connection is gone."""
        try:
            self._call_on(lease.generation, "release", keys=list(lease.keys))
        except StaleHandleError:
            return
        finally:
            self._drop_handle(lease)

    def pin_for(self, device: torch.device) -> None:
        """Register the mapped arena with CUDA for copies on ``device``, in this process; see ``Store.pin_for``."""
        if self.config.host.pin and device.type == "cuda" and self.arena is not None:
            self._pin_devices.add(device)
            self.arena.start_pinning(self.config.host.pin_chunk_bytes, device)

    def _pin_for_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        for device in {block.device for block in blocks if block.device.type == "cuda"}:
            self.pin_for(device)

    def _drop_handle(self, handle: Handle) -> None:
        self._drop(handle.generation, handle.keys)

    def slot_rows(self, handle: Handle | None = None) -> torch.Tensor:
        """The mapped arena as ``(num_slots, slot_bytes)`` uint8 rows: of ``handle``'s connection, which must
        be the current one (else ``StaleHandleError``), or without a handle the current arena."""
        return self._arena_of(handle, "slot_rows").rows()

    def slot_view(self, slot: int, handle: Handle | None = None) -> torch.Tensor:
        """The block bytes of arena slot ``slot`` (of ``handle``, as in ``slot_rows``) as a flat tensor of the
        layout's dtype."""
        return self._arena_of(handle, "slot_view").slot(slot)[: self.layout.block_bytes].view(self.layout.torch_dtype)

    def _arena_of(self, handle: Handle | None, what: str) -> HostArena:
        self._local_only(what)
        conn = self._conn
        if handle is not None and (handle.generation != conn.generation or conn.broken):
            raise StaleHandleError(f"a handle of connection {handle.generation}, not of this client's live connection "
                                   f"{conn.generation} (the daemon restarted or the connection was reopened)")
        assert self.arena is not None
        with self._arena_lock:
            arena = self._arenas.get(conn.arena_name or "") if handle is not None else self.arena
        if arena is None:
            raise StaleHandleError(f"the arena of connection {conn.generation} is no longer mapped")
        return arena

    def _local_only(self, what: str) -> None:
        if self.arena is None:
            raise ConfigError(f"{what}() maps the daemon's arena: it needs a Unix-socket connection")

    # -- housekeeping -----------------------------------------------------------------------------------

    def _check_blocks(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> list[bytes]:
        if self._closed:
            raise ClosedError("the client is closed")
        return check_keys_and_blocks(self.layout, keys, blocks)

    def stats(self) -> StoreStats:
        return stats_from_dict(self._call("stats")["stats"])

    def flush(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Ask the daemon to write what its lower tiers hold in memory now; done within ``timeout_s``, else
        ``FlushTimeoutError`` (see ``Store.flush``)."""
        self._call("flush", timeout_s=timeout_s, wait_s=timeout_s + self.timeout_s)

    def close(self) -> None:
        """Finish running jobs, then disconnect and unmap the arena. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.transfer.close()
        self._conn.close()
        with self._arena_lock:
            parked, self._parked = list(self._parked.values()), {}
        for conn in parked:
            conn.close()
        with self._arena_lock:
            for arena in self._arenas.values():
                arena.close()
            self._arenas.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
