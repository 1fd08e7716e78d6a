"""One client connection's state and the handlers of its ops, on top of the daemon's ``Store``.

Promises:
- A session remembers every slot it reserved and every read lease it holds; ``close`` aborts the
  reservations (their blocks never become readable) and drops the leases, so a client that disconnects or
  dies leaks no slot and leaves no partial block.
- A session commits, aborts and releases only what it reserved or leased itself: anything else is an
  ``InvalidInputError`` reply and changes nothing.
- Request fields are checked before the store is called; a malformed field is an ``InvalidInputError``.
- Payload ops (``put`` / ``get``) copy between frame bytes and arena slots inside the daemon; a ``put`` whose
  copy fails is aborted, never committed.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtier.epochs import check_scope
from kvtier.errors import AuthError, InvalidInputError, LayoutMismatchError, ProtocolError
from kvtier.keys import check_keys
from kvtier.layout import KVLayout
from kvtier.store import FLUSH_WAIT_S, PROMOTION_WAIT_S, Lease, Reservation, Store

if TYPE_CHECKING:
    from kvtier.daemon.server import Daemon

from kvtier.daemon.protocol import Message

Handler = Callable[["Session", Message], dict[str, Any]]
# Ops that read or change blocks need a layout in the hello; an observer (``kvtier stats``) has none.
_STORE_OPS = frozenset({"lookup", "contains", "reserve", "commit", "abort", "acquire", "release", "put", "get",
                        "flush", "epoch", "advance_epoch", "removed_since"})


def _keys(message: Message, *, checked: bool = True) -> list[bytes]:
    """The request's keys; ``checked=False`` where the store call validates them itself (the hot path)."""
    keys = message.get("keys")
    if not isinstance(keys, list):
        raise InvalidInputError("'keys' must be a list of 16-byte keys")
    return check_keys(keys) if checked else keys


def _scope(message: Message) -> str:
    return check_scope(message.get("scope"))


def _flag(message: Message, field: str, default: bool) -> bool:
    value = message.get(field, default)
    if not isinstance(value, bool):
        raise InvalidInputError(f"'{field}' must be a bool")
    return value


class Session:
    """The state of one connection; ``handle`` is called from that connection's thread only."""

    def __init__(self, daemon: Daemon, transport: str, peer: str) -> None:
        self.daemon = daemon
        self.transport = transport
        self.peer = peer
        self.namespace = ""
        self.greeted = False
        self.store: Store | None = None
        self._reserved: set[bytes] = set()
        self._leased: Counter[bytes] = Counter()
        # Read by the stats of other threads: a plain int, never an iteration over a changing Counter.
        self._leased_total = 0
        # Set while the daemon keeps the slots of a connection it ended for a peer that may still copy.
        self.held_after_error = False

    def handle(self, message: Message) -> dict[str, Any]:
        """The reply fields of one request; raises ``KvtierError`` for an error reply."""
        op = message.get("op")
        if op == "hello":
            return self._hello(message)
        if not self.greeted:
            raise ProtocolError("the first request of a connection must be 'hello'")
        if op == "stats":
            return self.daemon.stats_reply()
        if op not in _STORE_OPS:
            raise InvalidInputError(f"unknown op {op!r}")
        if self.store is None:
            raise InvalidInputError(f"op {op!r} needs a hello with a layout")
        return _HANDLERS[op](self, message)

    def _hello(self, message: Message) -> dict[str, Any]:
        if self.greeted:
            raise ProtocolError("a second 'hello' on one connection")
        token = self.daemon.config.daemon.tcp_token
        if self.transport == "tcp" and not hmac.compare_digest(str(message.get("token", "")).encode(),
                                                                 token.encode()):
            self.daemon.count_auth_failure()
            raise AuthError("wrong or missing token")
        namespace = message.get("namespace", "")
        if not isinstance(namespace, str):
            raise InvalidInputError("'namespace' must be a string")
        layout_fields = message.get("layout")
        reply: dict[str, Any] = {"max_frame_bytes": self.daemon.config.daemon.max_frame_bytes}
        if layout_fields is not None:
            if not isinstance(layout_fields, dict):
                raise InvalidInputError("'layout' must be a map of KVLayout fields")
            try:
                layout = KVLayout.from_dict(layout_fields)
            except (TypeError, ValueError) as exc:  # keys that are not field names, values of no known kind
                raise InvalidInputError(f"'layout' is not a KV layout: {exc}") from exc
            store = self.daemon.store_for(layout)
            if store.layout != layout:
                raise LayoutMismatchError(f"the daemon serves layout {store.layout.to_dict()}, not {layout.to_dict()}")
            reply.update(layout=layout.to_dict(), hash_algo=store.config.hash_algo, num_slots=store.arena.num_slots,
                         slot_bytes=store.slot_bytes, block_bytes=layout.block_bytes,
                         arena=store.arena.name if self.transport == "unix" else None)
            self.store = store
        self.namespace = namespace
        self.greeted = True
        return reply

    def _require_store(self) -> Store:
        assert self.store is not None
        return self.store

    def _lookup(self, message: Message) -> dict[str, Any]:
        result = self._require_store().lookup(_keys(message, checked=False), prefetch=_flag(message, "prefetch", True),
                                              scope=_scope(message) if "scope" in message else None)
        return {"num_blocks": result.num_blocks, "tiers": [tier.value for tier in result.tiers],
                "epoch": result.epoch}

    def _epoch(self, message: Message) -> dict[str, Any]:
        return {"epoch": self._require_store().epoch(_scope(message))}

    def _advance_epoch(self, message: Message) -> dict[str, Any]:
        return {"epoch": self._require_store().advance_epoch(_scope(message))}

    def _removed_since(self, message: Message) -> dict[str, Any]:
        removals = self._require_store().removed_since(message.get("seq"))  # type: ignore[arg-type]  # the log checks it
        return {"next_seq": removals.next_seq, "keys": list(removals.keys), "overflowed": removals.overflowed,
                "log_id": removals.log_id}

    def _contains(self, message: Message) -> dict[str, Any]:
        keys = _keys(message)
        if len(keys) != 1:
            raise InvalidInputError("'contains' takes exactly one key")
        tier = self._require_store().contains(keys[0])
        return {"tier": None if tier is None else tier.value}

    def _reserve(self, message: Message) -> dict[str, Any]:
        reservation = self._require_store().reserve(_keys(message))
        self._reserved.update(reservation.keys)
        return {"keys": list(reservation.keys), "slots": list(reservation.slots), "skipped": list(reservation.skipped)}

    def _own_reserved(self, message: Message) -> Reservation:
        keys = _keys(message)
        if not self._reserved.issuperset(keys):
            raise InvalidInputError("commit/abort of keys this connection has not reserved")
        self._reserved.difference_update(keys)
        return Reservation(tuple(keys), (), ())

    def _commit(self, message: Message) -> dict[str, Any]:
        self._require_store().commit(self._own_reserved(message))
        return {}

    def _abort(self, message: Message) -> dict[str, Any]:
        self._require_store().abort(self._own_reserved(message))
        return {}

    def _acquire_all(self, keys: list[bytes], prefix: bool, timeout: float | None) -> list[int | None]:
        """Lease the leading run of ``keys`` or, unless ``prefix``, every readable key; ``None`` for a miss."""
        store = self._require_store()
        slots: list[int | None] = [None] * len(keys)
        start = 0
        # One deadline for the whole call: a get with many gaps on a tier that does not answer would otherwise
        # wait the timeout once per gap.
        deadline = time.monotonic() + (PROMOTION_WAIT_S if timeout is None else timeout)
        try:
            while start < len(keys):
                lease = store.acquire(keys[start:], max(0.0, deadline - time.monotonic()))
                self._leased.update(lease.keys)
                self._leased_total += len(lease.keys)
                slots[start : start + len(lease.slots)] = lease.slots
                if prefix:
                    break
                start += len(lease.slots) + 1
        except BaseException:
            # The client gets an error reply and never learns these slots: it could not release them.
            self._release_keys([key for key, slot in zip(keys, slots, strict=True) if slot is not None])
            raise
        return slots

    def _acquire(self, message: Message) -> dict[str, Any]:
        timeout = message.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or not 0 <= timeout < math.inf):
            raise InvalidInputError("'timeout' must be a finite, non-negative number of seconds")
        keys = _keys(message)
        slots = self._acquire_all(keys, _flag(message, "prefix", True), timeout)
        return {"keys": [key for key, slot in zip(keys, slots, strict=True) if slot is not None],
                "slots": slots}

    def _release(self, message: Message) -> dict[str, Any]:
        keys = _keys(message)
        if any(self._leased[key] == 0 for key in keys):
            raise InvalidInputError("release of keys this connection has not leased")
        self._release_keys(keys)
        return {}

    def _release_keys(self, keys: list[bytes]) -> None:
        self._require_store().release(Lease(tuple(keys), ()))
        self._leased.subtract(keys)
        self._leased_total -= len(keys)
        for key in keys:
            if self._leased[key] <= 0:
                del self._leased[key]

    def _put(self, message: Message) -> dict[str, Any]:
        store = self._require_store()
        keys = _keys(message)
        data = message.get("data")
        block_bytes = store.layout.block_bytes
        if not isinstance(data, list) or len(data) != len(keys) or any(
                not isinstance(item, bytes) or len(item) != block_bytes for item in data):
            raise InvalidInputError(f"'data' must hold one bin of {block_bytes} bytes per key")
        reservation = store.reserve(keys)
        by_key = dict(zip(keys, data, strict=True))
        try:
            for key, slot in zip(reservation.keys, reservation.slots, strict=True):
                store.host.payload(slot).numpy()[:] = np.frombuffer(by_key[key], dtype=np.uint8)
        except BaseException:
            store.abort(reservation)
            raise
        store.commit(reservation)
        return {}

    def _get(self, message: Message) -> dict[str, Any]:
        store = self._require_store()
        keys = _keys(message)
        slots = self._acquire_all(keys, prefix=False, timeout=None)
        leased = [key for key, slot in zip(keys, slots, strict=True) if slot is not None]
        try:
            data = [None if slot is None else store.host.payload(slot).numpy().tobytes() for slot in slots]
        finally:
            self._release_keys(leased)
        return {"data": data}

    def _flush(self, message: Message) -> dict[str, Any]:
        timeout_s = message.get("timeout_s", FLUSH_WAIT_S)
        if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= FLUSH_WAIT_S:
            raise InvalidInputError(f"'timeout_s' must be a number of seconds in (0, {FLUSH_WAIT_S:g}]")
        self._require_store().flush(float(timeout_s))
        return {}

    def close(self) -> None:
        """Abort this connection's reservations and drop its leases (the client is gone)."""
        if self.store is None:
            return
        if self._reserved:
            self.store.abort(Reservation(tuple(self._reserved), (), ()))
            self._reserved.clear()
        if self._leased:
            self.store.release(Lease(tuple(self._leased.elements()), ()))
            self._leased.clear()
            self._leased_total = 0

    @property
    def held(self) -> tuple[int, int]:
        """(reserved blocks, leased blocks) held by this connection now."""
        return len(self._reserved), self._leased_total


_HANDLERS: dict[str, Handler] = {
    "lookup": Session._lookup, "contains": Session._contains, "reserve": Session._reserve,
    "commit": Session._commit, "abort": Session._abort, "acquire": Session._acquire,
    "release": Session._release, "put": Session._put, "get": Session._get, "flush": Session._flush,
    "epoch": Session._epoch, "advance_epoch": Session._advance_epoch, "removed_since": Session._removed_since,
}
