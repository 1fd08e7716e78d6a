"""Values of the remote tier: the disk tier's entry header (``kvtier.disk.format``) followed by the payload.

A value is ``[header: HEADER_BYTES][stored payload]``, with no page padding (it is never read with
O_DIRECT). The header carries the format version, the block key, the codec, the stored and raw lengths and
the payload checksum, and its own checksum.

Promises:
- ``seal`` turns a value whose payload was copied in by ``new_value`` into a complete value (in place when
  not compressed); ``seal_borrowed`` makes one of a payload it does not copy (a ``SplitValue``);
  ``read_value`` returns ``"ok"`` only after the header, the key, the lengths and the
  payload checksum all verified and the raw bytes were written to ``dst``.
- ``read_value`` never raises on bad bytes: ``"corrupt"`` (bad header, truncated, failed checksum, bad
  encoding) or ``"foreign"`` (an intact value of another key or block size).
"""

from __future__ import annotations

import ctypes
from typing import Literal

import numpy as np
import torch

from kvtier.disk.codec import ZstdCodec
from kvtier.disk.format import CODEC_NONE, CODEC_ZSTD, HEADER_BYTES, EntryHeader, checksum, pack_header, parse_header

ValueStatus = Literal["ok", "corrupt", "foreign"]


def _address(buffer: bytes | bytearray | memoryview) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def new_value(payload: torch.Tensor, reuse: bytearray | None = None) -> bytearray:
    """A value buffer (``reuse`` if given and of the right size) with ``payload`` (a contiguous uint8 CPU
    tensor) copied after room for the header."""
    nbytes = payload.numel()
    value = reuse if reuse is not None and len(reuse) == HEADER_BYTES + nbytes else bytearray(HEADER_BYTES + nbytes)
    # One memmove without the GIL: this runs on the caller's thread (a put's or an eviction's).
    ctypes.memmove(_address(value) + HEADER_BYTES, payload.data_ptr(), nbytes)
    return value


class SplitValue:
    """A value sent as two pieces, its header and a borrowed payload, with no copy joining them (the
    connections of ``kvtier.tiers.redis_client`` frame it as one bulk string)."""

    __slots__ = ("header", "payload")

    def __init__(self, header: bytes, payload: memoryview) -> None:
        self.header, self.payload = header, payload

    def __len__(self) -> int:
        return len(self.header) + len(self.payload)


def _compressed(key: bytes, raw: memoryview, codec: ZstdCodec | None) -> bytearray | None:
    """The complete zstd value for ``key``, or ``None`` without a codec or where compression saves nothing."""
    packed = None if codec is None else codec.encode(raw)
    if codec is None or packed is None:
        return None
    sealed = bytearray(HEADER_BYTES + len(packed))
    sealed[HEADER_BYTES:] = packed
    pack_header(EntryHeader(key, CODEC_ZSTD, codec.planes, len(packed), len(raw), checksum(packed)), memoryview(sealed))
    return sealed


def seal_borrowed(key: bytes, payload: memoryview, codec: ZstdCodec | None) -> SplitValue | bytearray:
    """The value for ``key`` over a payload that is not copied (unless ``codec`` compresses it)."""
    compressed = _compressed(key, payload, codec)
    if compressed is not None:
        return compressed
    header = bytearray(HEADER_BYTES)
    pack_header(EntryHeader(key, CODEC_NONE, 1, len(payload), len(payload), checksum(payload)), memoryview(header))
    return SplitValue(bytes(header), payload)


def seal(key: bytes, value: bytearray, codec: ZstdCodec | None) -> bytes | bytearray:
    """The complete value for ``key``: header packed, payload compressed if ``codec`` saves space."""
    raw = memoryview(value)[HEADER_BYTES:]
    compressed = _compressed(key, raw, codec)
    if compressed is not None:
        return compressed
    pack_header(EntryHeader(key, CODEC_NONE, 1, len(raw), len(raw), checksum(raw)), memoryview(value))
    return value


def read_value(value: bytes, key: bytes, dst: memoryview, codec: ZstdCodec) -> ValueStatus:
    """Verify ``value`` as the block ``key`` of ``len(dst)`` bytes and write its raw bytes into ``dst``."""
    parsed = parse_header(value)
    if parsed is None:
        return "corrupt"
    header, _ = parsed
    if header.key != key or header.raw_len != len(dst):
        return "foreign"
    stored = memoryview(value)[HEADER_BYTES:]
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
