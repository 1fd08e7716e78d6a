"""The on-disk entry format of the disk tier: one header page, then the payload, all 4096-aligned.

An entry is ``[header page: 4096 bytes][payload, zero-padded to a multiple of 4096]`` and starts on a
4096-byte boundary of its region, so an O_DIRECT read of one entry is a single aligned I/O.

Promises:
- ``FORMAT_VERSION`` names this layout of entries and index records; it changes whenever either changes.
- ``pack_header`` and ``parse_header`` are inverse; ``parse_header`` returns ``None`` (never raises) for
  bytes that are not an intact header of this version: wrong magic, other version, failed header checksum.
- Checksums are xxh3_64 (xxhash). It runs at about 50 GiB/s on this machine against 3.9 GiB/s for
  ``zlib.crc32``, so verifying every read costs a few percent of a drive's time instead of a quarter, and
  its 64 bits make an undetected corruption far less likely than a 32-bit CRC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

# Bump on ANY change to the entry header, the entry layout, the codec encodings or the index records:
# a directory written by another version is refused (or wiped with ``wipe_incompatible``).
FORMAT_VERSION = 1

PAGE_BYTES = 4096
MAGIC = b"KVTE"
CODEC_NONE = 0
CODEC_ZSTD = 1

# magic, version, codec, planes, key, stored_len, raw_len, payload checksum; then the header checksum.
_BODY = struct.Struct("<4sHBB16sIIQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _BODY.size + _CHECKSUM.size


@dataclass(frozen=True, slots=True)
class EntryHeader:
    """What an entry says about itself. ``stored_len`` bytes follow on disk; they decode to ``raw_len``."""

    key: bytes
    codec: int
    planes: int
    stored_len: int
    raw_len: int
    payload_checksum: int


def round_up(nbytes: int, align: int = PAGE_BYTES) -> int:
    return -(-nbytes // align) * align


def entry_bytes(stored_len: int) -> int:
    """Bytes one entry takes in a region: the header page plus the padded payload."""
    return PAGE_BYTES + round_up(stored_len)


def checksum(data: memoryview | bytes) -> int:
    return int(xxhash.xxh3_64_intdigest(data))


def pack_header(header: EntryHeader, out: memoryview) -> int:
    """Write ``header`` into the first ``HEADER_BYTES`` of ``out``; returns the header checksum."""
    body = _BODY.pack(MAGIC, FORMAT_VERSION, header.codec, header.planes, header.key, header.stored_len,
                      header.raw_len, header.payload_checksum)
    header_checksum = checksum(body)
    out[: _BODY.size] = body
    _CHECKSUM.pack_into(out, _BODY.size, header_checksum)
    return header_checksum


def parse_header(data: memoryview | bytes) -> tuple[EntryHeader, int] | None:
    """The header and its checksum from the start of ``data``, or ``None`` if it is not an intact header."""
    if len(data) < HEADER_BYTES:
        return None
    body = bytes(data[: _BODY.size])
    magic, version, codec, planes, key, stored_len, raw_len, payload_checksum = _BODY.unpack(body)
    (header_checksum,) = _CHECKSUM.unpack_from(data, _BODY.size)
    if magic != MAGIC or version != FORMAT_VERSION or checksum(body) != header_checksum:
        return None
    return EntryHeader(key, codec, planes, stored_len, raw_len, payload_checksum), header_checksum
