"""Values of the remote tier: the disk tier's entry header (``kvtier.disk.format``) followed by the payload.

A value is ``[header: HEADER_BYTES][stored payload]``, with no page padding (it is never read with
O_DIRECT), followed with a secret (``remote.auth_secret``) by ``[tag: TAG_BYTES]``: keyed BLAKE3 of header
and stored payload. The header carries the format version, the block key, the codec, the stored and raw
lengths and the payload checksum, and its own checksum.

Promises:
- ``seal`` turns a value whose payload was copied in by ``new_value`` into a complete value (in place when
  not compressed); ``seal_borrowed`` makes one of a payload it does not copy (a ``SplitValue``);
  ``read_value`` returns ``"ok"`` only after the header, the key, the lengths and the
  payload checksum all verified and the raw bytes were written to ``dst``.
- With a tag key, ``read_value`` checks the tag first, before anything else is read from the value (a value
  without a valid tag is ``"forged"``); without one, a tagged value is ``"corrupt"`` (its length is wrong).
- ``read_value`` never raises on bad bytes, and never allocates more than the block size for them:
  ``"corrupt"`` (bad header, truncated, failed checksum, bad encoding, a compressed frame declaring another
  size) or ``"foreign"`` (an intact value of another key or block size).
"""

from __future__ import annotations

import ctypes
import hmac
from typing import Literal

import blake3
import numpy as np
import torch

from kvtier.disk.codec import ZstdCodec
from kvtier.disk.format import CODEC_NONE, CODEC_ZSTD, HEADER_BYTES, EntryHeader, checksum, pack_header, parse_header

ValueStatus = Literal["ok", "corrupt", "foreign", "forged"]
TAG_BYTES = 32


def tag_key(secret: str, purpose: str) -> bytes:
    """The 32-byte BLAKE3 key derived from ``secret`` for ``purpose`` ("value tag", "key name")."""
    return blake3.blake3(secret.encode(), derive_key_context=f"kvtier remote {purpose} v1").digest()


def _tag(mac_key: bytes, *pieces: bytes | bytearray | memoryview) -> bytes:
    hasher = blake3.blake3(key=mac_key)
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()


def _address(buffer: bytes | bytearray | memoryview) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def new_value(payload: torch.Tensor, reuse: bytearray | None = None, tag_bytes: int = 0) -> bytearray:
    """A value buffer (``reuse`` if given and of the right size) with ``payload`` (a contiguous uint8 CPU
    tensor) copied after room for the header, and ``tag_bytes`` of room after it."""
    nbytes = payload.numel()
    size = HEADER_BYTES + nbytes + tag_bytes
    value = reuse if reuse is not None and len(reuse) == size else bytearray(size)
    # One memmove without the GIL: this runs on the caller's thread (a put's or an eviction's).
    ctypes.memmove(_address(value) + HEADER_BYTES, payload.data_ptr(), nbytes)
    return value


class SplitValue:
    """A value sent as pieces, its header, a borrowed payload and a trailer (the tag, or nothing), with no
    copy joining them (the connections of ``kvtier.tiers.redis_client`` frame it as one bulk string)."""

    __slots__ = ("header", "payload", "trailer")

    def __init__(self, header: bytes, payload: memoryview, trailer: bytes = b"") -> None:
        self.header, self.payload, self.trailer = header, payload, trailer

    def __len__(self) -> int:
        return len(self.header) + len(self.payload) + len(self.trailer)


def _compressed(key: bytes, raw: memoryview, codec: ZstdCodec | None, mac_key: bytes | None) -> bytearray | None:
    """The complete zstd value for ``key``, or ``None`` without a codec or where compression saves nothing."""
    packed = None if codec is None else codec.encode(raw)
    if codec is None or packed is None:
        return None
    tag_bytes = TAG_BYTES if mac_key else 0
    sealed = bytearray(HEADER_BYTES + len(packed) + tag_bytes)
    sealed[HEADER_BYTES : HEADER_BYTES + len(packed)] = packed
    pack_header(EntryHeader(key, CODEC_ZSTD, codec.planes, len(packed), len(raw), checksum(packed)), memoryview(sealed))
    if mac_key:
        sealed[-TAG_BYTES:] = _tag(mac_key, memoryview(sealed)[:-TAG_BYTES])
    return sealed


def seal_borrowed(key: bytes, payload: memoryview, codec: ZstdCodec | None,
                  mac_key: bytes | None = None) -> SplitValue | bytearray:
    """The value for ``key`` over a payload that is not copied (unless ``codec`` compresses it); tagged
    with ``mac_key`` if given."""
    compressed = _compressed(key, payload, codec, mac_key)
    if compressed is not None:
        return compressed
    header = bytearray(HEADER_BYTES)
    pack_header(EntryHeader(key, CODEC_NONE, 1, len(payload), len(payload), checksum(payload)), memoryview(header))
    return SplitValue(bytes(header), payload, _tag(mac_key, header, payload) if mac_key else b"")


def seal(key: bytes, value: bytearray, codec: ZstdCodec | None, mac_key: bytes | None = None) -> bytes | bytearray:
    """The complete value for ``key`` in ``value`` (from ``new_value``, with tag room if ``mac_key``): header
    packed, payload compressed if ``codec`` saves space, tagged with ``mac_key`` if given."""
    tag_bytes = TAG_BYTES if mac_key else 0
    raw = memoryview(value)[HEADER_BYTES : len(value) - tag_bytes]
    compressed = _compressed(key, raw, codec, mac_key)
    if compressed is not None:
        return compressed
    pack_header(EntryHeader(key, CODEC_NONE, 1, len(raw), len(raw), checksum(raw)), memoryview(value))
    if mac_key:
        value[-TAG_BYTES:] = _tag(mac_key, memoryview(value)[:-TAG_BYTES])
    return value


def read_value(value: bytes, key: bytes, dst: memoryview, codec: ZstdCodec,
               mac_key: bytes | None = None) -> ValueStatus:
    """Verify ``value`` as the block ``key`` of ``len(dst)`` bytes (tagged with ``mac_key`` if given) and write
    its raw bytes into ``dst``."""
    try:
        if mac_key:
            if len(value) < HEADER_BYTES + TAG_BYTES:
                return "forged"
            body = memoryview(value)[:-TAG_BYTES]
            if not hmac.compare_digest(_tag(mac_key, body), value[-TAG_BYTES:]):
                return "forged"
            return _read(body, key, dst, codec)
        return _read(memoryview(value), key, dst, codec)
    except Exception:  # whatever the bytes make a decoder do, a bad value is a miss, never an error
        return "corrupt"


def _read(value: memoryview, key: bytes, dst: memoryview, codec: ZstdCodec) -> ValueStatus:
    parsed = parse_header(value)
    if parsed is None:
        return "corrupt"
    header, _ = parsed
    if header.key != key or header.raw_len != len(dst):
        return "foreign"
    stored = value[HEADER_BYTES:]
    if header.stored_len != len(stored) or checksum(stored) != header.payload_checksum:
        return "corrupt"
    if header.codec == CODEC_NONE:
        if header.stored_len != header.raw_len:
            return "corrupt"
        ctypes.memmove(_address(dst), _address(stored), len(dst))
        return "ok"
    if header.codec == CODEC_ZSTD:
        return "ok" if codec.decode_into(stored, header.planes, dst) else "corrupt"
    return "corrupt"
