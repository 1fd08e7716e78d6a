"""The daemon: one ``Store`` with a named shared-memory arena, served over a Unix socket and optionally TCP.

Threads: one acceptor per listener and one thread per connection; store calls block (an ``acquire`` may wait
for a disk read) only their own connection's thread.

Promises:
- A store that cannot be opened (a bad disk directory, a pool that does not fit) is a typed error reply
  (``DiskError``, ``ConfigError``, ...) to every hello that needs it, logged in one line, never an internal
  error; the daemon keeps serving and a later hello tries again.
- The daemon serves exactly one KV layout: the configured one, else the first hello's. A hello with another
  layout gets a ``LayoutMismatchError`` reply.
- An existing file at the socket path is replaced only if it is a socket no daemon answers on (a stale
  one); any other file, or a live socket, is a ``ConfigError`` and is left as it is.
- The Unix socket is mode 0600, or 0660 with the configured group (the arena file follows it); the TCP
  listener binds ``tcp_host`` (loopback by default) and requires the token.
- A protocol violation (malformed, oversized or wrong-version frame, a request before hello, a failed hello,
  a wrong token) or an internal error gets an error reply where a reply can be framed, and the daemon reads
  no more requests from that connection; an error of one request (bad keys, unknown op, no capacity) gets an
  error reply and the connection goes on. Nothing a client sends stops the daemon or touches another
  client's session.
- When a connection ends, its reservations are aborted and its leases released: when the peer closes it or
  dies, at once; when the daemon ended it (above) and it holds slots of a Unix client, once the peer closes
  it (its copies into or out of those slots are then done), at the latest ``daemon.hold_after_error_s``
  later, or at ``stop``. Until then no other client gets those slots.
- ``stop`` refuses new connections, ends every session (discarding uncommitted writes), waits for the
  request threads, then closes the store (which flushes the disk tier). It is idempotent.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kvtier.arena import ABANDONED_AFTER_S, remove_if_abandoned
from kvtier.config import StoreConfig
from kvtier.daemon.metrics import DaemonCollector, LatencyHistograms, MetricsServer
from kvtier.daemon.protocol import OPS, Message, default_socket_path, error, ok, pack, read_frame, stats_to_dict
from kvtier.daemon.session import Session
from kvtier.errors import ConfigError, DiskError, KvtierError, ProtocolError
from kvtier.layout import KVLayout
from kvtier.store import Store
from kvtier.transfer import CpuTransferEngine

log = logging.getLogger(__name__)
_SHM_DIR = Path("/dev/shm")
_HELLO_FRAME_BYTES = 64 * 1024
# A thread still serving a request when the daemon stops gets this long to finish it.
_JOIN_TIMEOUT_S = 10.0
# Read at a time (and dropped) from a connection held open after its error reply.
_DRAIN_BYTES = 64 * 1024


class Daemon:
    """The daemon's state; ``start`` opens the listeners, ``stop`` closes everything."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.socket_path = config.daemon.socket_path or default_socket_path()
        self.started_at = time.time()
        self.latency = LatencyHistograms()
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._lock = threading.Lock()
        self._sessions: dict[socket.socket, Session] = {}
        self._threads: set[threading.Thread] = set()
        self._listeners: list[socket.socket] = []
        self._acceptors: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._auth_failures = 0
        self._error_replies: Counter[str] = Counter()
        self.metrics: MetricsServer | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._bound_socket = False
        self._gid: int | None = None
        if config.daemon.socket_group:
            try:
                self._gid = grp.getgrnam(config.daemon.socket_group).gr_gid
            except KeyError:
                raise ConfigError(f"daemon.socket_group {config.daemon.socket_group!r} is not a group") from None

    # -- the store ------------------------------------------------------------------------------------

    def store_for(self, layout: KVLayout) -> Store:
        """The daemon's store, opened for ``layout`` if no store is open yet."""
        with self._store_lock:
            if self._store is None:
                if self._stopping.is_set():
                    raise ProtocolError("the daemon is stopping")
                name = f"kvtier-daemon-{os.getpid()}-{os.urandom(4).hex()}"
                # The daemon copies between sockets and the arena only: CPU copies, no CUDA context, and
                # the arena is registered with CUDA by the clients that copy to a GPU, not here.
                try:
                    self._store = Store(layout, self.config, arena_name=name,
                                        transfer=CpuTransferEngine(self.config.transfer.num_workers))
                except OSError as exc:  # a disk directory that cannot be made or locked: the tier as a whole
                    log.error("cannot open the store for layout %s: %s", layout.to_dict(), exc)
                    raise DiskError(f"the daemon cannot open its store: {exc}") from exc
                except KvtierError as exc:
                    log.error("cannot open the store for layout %s: %s", layout.to_dict(), exc)
                    raise
                shm = _SHM_DIR / name
                if self._gid is not None:
                    os.chown(shm, -1, self._gid)
                    shm.chmod(0o660)
                disk = self._store.disk
                log.info("opened store: layout %s (block %d bytes, fingerprint %s); host pool %d slots x %d bytes "
                         "= %.1f MiB in shared memory %s; disk tier %s", layout.to_dict(), layout.block_bytes,
                         layout.fingerprint, self._store.arena.num_slots, self._store.slot_bytes,
                         self._store.arena.total_bytes / 2**20, shm,
                         "off" if disk is None else f"{list(self.config.disk.paths)} {_disk_summary(self._store)}")
            return self._store

    # -- listeners ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store (if a layout is configured), the listeners and the metrics endpoint."""
        _remove_stale_arenas()
        if self.config.daemon.layout is not None:
            self.store_for(self.config.daemon.layout)
        self._listen_unix()
        if self.config.daemon.tcp_port:
            self._listen_tcp()
        if self.config.daemon.metrics_port:
            self.metrics = MetricsServer(DaemonCollector(self.stats_snapshot, self.latency),
                                         self.config.daemon.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.metrics.port)

    def _listen_unix(self) -> None:
        path = Path(self.socket_path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket: the daemon replaces only the stale socket of "
                                  "a daemon that died; remove it or choose another --socket / daemon.socket_path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket of a daemon that died
            else:
                raise ConfigError(f"another daemon is listening on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file is created by bind(): a tight umask closes the window before the chmod below.
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(path, -1, self._gid)
            path.chmod(0o660)
        self._bound_socket = True
        listener.listen(128)
        self._add_listener(listener, "unix")
        log.info("listening on unix socket %s (mode %s)", path, "0660" if self._gid is not None else "0600")

    def _listen_tcp(self) -> None:
        cfg = self.config.daemon
        listener = socket.create_server((cfg.tcp_host, cfg.tcp_port), backlog=128)
        self.tcp_address = listener.getsockname()[:2]
        self._add_listener(listener, "tcp")
        log.info("listening on tcp %s:%d (token required)", *self.tcp_address)

    def _add_listener(self, listener: socket.socket, transport: str) -> None:
        # A timeout lets the acceptor notice ``stop`` without relying on close() waking accept().
        listener.settimeout(0.2)
        self._listeners.append(listener)
        thread = threading.Thread(target=self._accept_loop, args=(listener, transport), daemon=True,
                                  name=f"kvtier-accept-{transport}")
        self._acceptors.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket, transport: str) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("accept on %s failed: %s", transport, exc)
                time.sleep(0.1)  # e.g. out of file descriptors: back off instead of spinning
                continue
            conn.settimeout(None)
            if transport == "tcp":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(self, transport, str(address) or "unix")
            thread = threading.Thread(target=self._serve, args=(conn, session), daemon=True, name="kvtier-conn")
            with self._lock:
                self._sessions[conn] = session
                self._threads.add(thread)
            thread.start()

    # -- one connection ---------------------------------------------------------------------------------

    def _serve(self, conn: socket.socket, session: Session) -> None:
        ended_here = False  # the daemon, not the peer, ends the connection: the peer may still be copying
        try:
            while True:
                # Until a hello succeeds (the token, for TCP) no one may make the daemon buffer a large frame.
                limit = self.config.daemon.max_frame_bytes if session.greeted else _HELLO_FRAME_BYTES
                try:
                    message = read_frame(conn, limit)
                except ProtocolError as exc:
                    ended_here = self._send(conn, self._error_reply(0, exc))
                    return
                if message is None:
                    return
                reply, close = self._dispatch(session, message)
                if not self._send(conn, reply):
                    return
                if close:
                    ended_here = True
                    return
        except OSError:
            return  # the peer vanished mid-frame: the session is cleaned up below like any disconnect
        finally:
            if ended_here:
                self._hold_until_peer_closes(conn, session)
            try:
                session.close()
            except KvtierError as exc:
                log.debug("cleanup of a session after the store closed: %s", exc)
            with self._lock:
                self._sessions.pop(conn, None)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _hold_until_peer_closes(self, conn: socket.socket, session: Session) -> None:
        """Keep ``session``'s slots while its peer, told the connection is over, may still copy into or out of them.

        A client that maps the arena (Unix) copies with its own threads or GPU streams, and closes the
        connection once those copies are done (a replaced connection is kept open until then). Freed at once,
        a reserved slot could go to another writer's put and be overwritten by the late copy, or a leased one
        be rewritten under a read still running. So the write side is shut (the client's next read finds the
        end of the stream and it reconnects), and the session lives on until the peer closes, its process
        ends, the daemon stops, or ``daemon.hold_after_error_s`` passes; bytes it sends meanwhile are dropped
        unread. A TCP client never maps the arena and a session without slots has nothing to protect: freed
        at once.
        """
        if session.transport != "unix" or session.held == (0, 0):
            return
        session.held_after_error = True
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + self.config.daemon.hold_after_error_s
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                reserved, leased = session.held
                log.warning("freeing %d reserved and %d leased slots of a connection still open %g s after its "
                            "error reply", reserved, leased, self.config.daemon.hold_after_error_s)
                return
            try:
                conn.settimeout(left)
                if not conn.recv(_DRAIN_BYTES):
                    return
            except TimeoutError:
                continue
            except OSError:  # reset: the peer is gone
                return

    def _dispatch(self, session: Session, message: Message) -> tuple[Message, bool]:
        """The reply to one request and whether the connection must close after it."""
        op = message.get("op")
        request_id: int = message["id"]
        start = time.perf_counter()
        try:
            return ok(request_id, **session.handle(message)), False
        except ProtocolError as exc:
            return self._error_reply(request_id, exc), True
        except KvtierError as exc:
            # A failed hello leaves a session without a layout or identity: nothing sensible can follow.
            return self._error_reply(request_id, exc), op == "hello"
        except TimeoutError as exc:
            return self._error_reply(request_id, exc, "JobTimeoutError"), False
        except Exception as exc:
            log.exception("internal error serving op %r", op)
            return self._error_reply(request_id, exc, "InternalError"), True
        finally:
            self.latency.observe(op if op in OPS else "other", time.perf_counter() - start)

    def _error_reply(self, request_id: int, exc: BaseException, kind: str | None = None) -> Message:
        kind = kind or type(exc).__name__
        with self._lock:
            self._error_replies[kind] += 1
        return error(request_id, kind, str(exc))

    @staticmethod
    def _send(conn: socket.socket, message: Message) -> bool:
        try:
            conn.sendall(pack(message))
        except OSError:
            return False
        return True

    def count_auth_failure(self) -> None:
        with self._lock:
            self._auth_failures += 1

    # -- stats ------------------------------------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, Any]:
        """Store stats (``None`` before a layout is known) and the daemon's own counters, as plain data."""
        store = self._store
        with self._lock:
            clients = Counter(session.transport for session in self._sessions.values())
            held = [session.held for session in self._sessions.values()]
            namespaces = Counter(session.namespace for session in self._sessions.values() if session.namespace)
            daemon = {
                "clients": {"unix": clients["unix"], "tcp": clients["tcp"]},
                "namespaces": dict(namespaces),
                "auth_failures": self._auth_failures,
                "error_replies": dict(self._error_replies),
                "reserved_blocks": sum(reserved for reserved, _ in held),
                "leased_blocks": sum(leased for _, leased in held),
                "held_after_error": sum(session.held_after_error for session in self._sessions.values()),
            }
        return {"stats": None if store is None else stats_to_dict(store.stats()), **daemon}

    def stats_reply(self) -> dict[str, Any]:
        snap = self.stats_snapshot()
        store = self._store
        ops = {op: {"count": hist.count, "mean_us": hist.sum_s / max(1, hist.count) * 1e6,
                    "p50_us": hist.quantile_s(0.5) * 1e6, "p99_us": hist.quantile_s(0.99) * 1e6}
               for op, hist in sorted(self.latency.snapshot().items())}
        return {
            "stats": snap.pop("stats"),
            "daemon": {**snap, "pid": os.getpid(), "uptime_s": time.time() - self.started_at, "ops": ops,
                       "socket_path": self.socket_path,
                       "tcp": None if self.tcp_address is None else f"{self.tcp_address[0]}:{self.tcp_address[1]}",
                       "metrics_port": None if self.metrics is None else self.metrics.port,
                       "layout": None if store is None else store.layout.to_dict(),
                       "pool_bytes": None if store is None else store.arena.total_bytes,
                       "disk_paths": list(self.config.disk.paths)},
        }

    # -- shutdown ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop accepting, end every session, close the store. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for thread in self._acceptors:
            thread.join()
        for listener in self._listeners:
            listener.close()
        with self._lock:
            conns = list(self._sessions)
            threads = list(self._threads)
        for conn in conns:
            # shutdown() wakes the thread blocked in recv; it then cleans its session up itself.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.metrics is not None:
            self.metrics.close()
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                tiers = self._store.stats().tiers
                log.info("store closed: %s", ", ".join(f"{name} {tier.used_blocks} of {tier.capacity_blocks} blocks"
                                                        for name, tier in tiers.items()))
        if self._bound_socket:
            Path(self.socket_path).unlink(missing_ok=True)
        log.info("daemon stopped")


def _disk_summary(store: Store) -> str:
    assert store.disk is not None
    detail = store.disk.stats()
    return ", ".join(f"{key}={value}" for key, value in vars(detail).items()
                     if any(word in key for word in ("direct", "capacity", "used", "recovered", "region")))


def _remove_stale_arenas(min_age_s: float = ABANDONED_AFTER_S) -> None:
    """Unlink the arenas of daemons of this user that died without cleaning up (SIGKILL, OOM).

    The process id in the name only spares a live daemon of this PID namespace (one of an older kvtier holds
    no lock); a daemon in another container sharing ``/dev/shm`` has an unrelated id here, and its arena is
    spared by the lock it holds (``kvtier.arena.remove_if_abandoned``).
    """
    for path in _SHM_DIR.glob("kvtier-daemon-*"):
        try:
            pid = int(path.name.split("-")[2])
            if path.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            if remove_if_abandoned(path, min_age_s):
                log.info("removed the arena of dead daemon %d: %s", pid, path)
        except (ValueError, IndexError, OSError):
            continue
