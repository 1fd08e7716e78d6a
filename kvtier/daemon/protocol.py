"""The daemon's wire protocol: length-prefixed msgpack frames, the ops, and the error replies.

A frame is a 4-byte big-endian body length followed by a msgpack map. A request is
``{"v": VERSION, "op": str, "id": int, ...fields}``; its reply is ``{"v", "id", "status": "ok", ...}`` or
``{"v", "id", "status": "error", "kind": str, "message": str}``, ``kind`` naming the daemon-side error class.

Ops (fields in brackets; keys are 16-byte msgpack bins):

- ``hello`` [layout: map | nil, namespace: str, token: str] -> arena, num_slots, slot_bytes, block_bytes,
  hash_algo, max_frame_bytes, layout. Must come first; a hello without a layout may only ask for ``stats``.
- ``lookup`` [keys, prefetch, scope] -> num_blocks, tiers, epoch (``scope``'s key epoch; nil without a scope).
  ``contains`` is ``lookup`` of one key without counting.
- ``reserve`` [keys] -> keys, slots, skipped (all or a ``CapacityError`` reply). ``commit`` / ``abort`` [keys].
- ``acquire`` [keys, prefix, timeout] -> keys, slots (a read lease; ``prefix`` false leases every readable
  key, not only the leading run; ``slots[i]`` is nil for a miss). ``release`` [keys].
- ``put`` [keys, data: list of bins] (all stored, or a ``CapacityError`` reply); ``get`` [keys] -> data
  (bin or nil per key): payloads in frames, for TCP clients that cannot map the arena.
- ``stats`` -> stats (``stats_to_dict`` of the store's ``StoreStats``, nil before a layout is known),
  daemon (clients, errors, op latencies).
- ``flush``: write the disk tier's open region.
- ``epoch`` [scope] -> epoch; ``advance_epoch`` [scope] -> epoch (the new one): the store's key epochs
  (``kvtier.epochs``), one per scope, shared by every client of the daemon.
- ``removed_since`` [seq] -> next_seq, keys, overflowed, log_id: the store's log of keys no tier holds any more
  (``kvtier.removals``), the same for every client.

Promises:
- ``read_frame`` refuses a body longer than ``max_frame_bytes`` before reading it (``ProtocolError``), commits
  memory for the bytes that arrived rather than for the length a header announces, and turns every
  malformed body into a ``ProtocolError``; it returns only dicts with the right ``v``, an int
  ``id`` and, where there is an ``op``, a str one.
- ``read_frame`` returns ``None`` on a clean end of stream between frames; a stream cut inside a frame is
  a ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from kvtier.errors import ProtocolError
from kvtier.stats import StoreStats, TierStats

VERSION = 1
HEADER = struct.Struct(">I")
OPS = frozenset({"hello", "lookup", "contains", "reserve", "commit", "abort", "acquire", "release", "put", "get",
                 "stats", "flush", "epoch", "advance_epoch", "removed_since"})
Message = dict[str, Any]


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/kvtier/kvtier.sock``, or ``/tmp/kvtier-UID/kvtier.sock`` without a runtime directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    directory = os.path.join(runtime, "kvtier") if runtime else f"/tmp/kvtier-{os.getuid()}"
    return os.path.join(directory, "kvtier.sock")


def pack(message: Message) -> bytes:
    """One frame (header and body) carrying ``message``."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _read_exactly(sock: socket.socket, size: int, *, at_start: bool) -> memoryview | None:
    # Uninitialised memory (not a zeroed bytearray): the pages of a large body are committed as its bytes
    # arrive, so a header alone (a peer announcing 256 MiB, then silent) costs address space, not RAM.
    view = np.empty(size, dtype=np.uint8).data
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            if at_start and got == 0:
                return None
            raise ProtocolError(f"the stream ended inside a frame ({got} of {size} bytes)")
        got += count
    return view


def read_body(sock: socket.socket, max_frame_bytes: int) -> Any:
    """The decoded body of the next frame, ``None`` at a clean end of stream."""
    header = _read_exactly(sock, HEADER.size, at_start=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise ProtocolError(f"a frame of {length} bytes exceeds max_frame_bytes={max_frame_bytes}")
    body = _read_exactly(sock, length, at_start=False)
    assert body is not None
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"a frame body is not valid msgpack: {type(exc).__name__}") from exc


def read_frame(sock: socket.socket, max_frame_bytes: int) -> Message | None:
    """The next request or reply from ``sock``, checked for shape and version; ``None`` at end of stream."""
    message = read_body(sock, max_frame_bytes)
    if message is None:
        return None
    if not isinstance(message, dict):
        raise ProtocolError(f"a frame must be a msgpack map, got {type(message).__name__}")
    if message.get("v") != VERSION:
        raise ProtocolError(f"protocol version {message.get('v')!r} is not supported (this side speaks {VERSION})")
    if not isinstance(message.get("id"), int) or isinstance(message.get("id"), bool):
        raise ProtocolError("a frame needs an integer 'id'")
    if "op" in message and not isinstance(message["op"], str):
        raise ProtocolError("'op' must be a string")
    return message


def ok(request_id: int, **fields: Any) -> Message:
    return {"v": VERSION, "id": request_id, "status": "ok", **fields}


def error(request_id: int, kind: str, message: str) -> Message:
    return {"v": VERSION, "id": request_id, "status": "error", "kind": kind, "message": message}


def stats_to_dict(stats: StoreStats) -> dict[str, Any]:
    """A ``StoreStats`` as plain msgpack- and JSON-ready data (its tiers and their details as dicts)."""
    data = {field.name: getattr(stats, field.name) for field in dataclasses.fields(stats)}
    data["tiers"] = {name: {**{field.name: getattr(tier, field.name) for field in dataclasses.fields(tier)},
                            "detail": dict(tier.detail)}
                     for name, tier in stats.tiers.items()}
    return data


def stats_from_dict(data: dict[str, Any]) -> StoreStats:
    """A ``StoreStats`` from its ``stats_to_dict`` form."""
    tiers = {name: TierStats(**{**tier, "detail": MappingProxyType(dict(tier["detail"]))})
             for name, tier in data["tiers"].items()}
    return StoreStats(**{**data, "tiers": MappingProxyType(tiers)})
