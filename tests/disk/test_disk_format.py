"""Entry headers and the zstd codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.disk.codec import ZstdCodec
from kvtier.disk.format import (
    CODEC_ZSTD,
    FORMAT_VERSION,
    HEADER_BYTES,
    EntryHeader,
    checksum,
    entry_bytes,
    pack_header,
    parse_header,
)

HEADER = EntryHeader(key=bytes(range(16)), codec=CODEC_ZSTD, planes=2, stored_len=1000, raw_len=4096,
                     payload_checksum=checksum(b"payload"))


def packed() -> bytearray:
    out = bytearray(HEADER_BYTES)
    pack_header(HEADER, memoryview(out))
    return out


def test_header_round_trips_with_its_checksum() -> None:
    out = bytearray(4096)
    header_checksum = pack_header(HEADER, memoryview(out))
    assert parse_header(memoryview(out)) == (HEADER, header_checksum)


@pytest.mark.parametrize("offset", range(HEADER_BYTES))
def test_any_flipped_header_byte_is_rejected(offset: int) -> None:
    data = packed()
    data[offset] ^= 0x01
    assert parse_header(bytes(data)) is None


def test_other_format_version_is_rejected_even_with_a_valid_checksum() -> None:
    data = packed()
    data[4:6] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    data[HEADER_BYTES - 8 :] = checksum(bytes(data[: HEADER_BYTES - 8])).to_bytes(8, "little")
    assert parse_header(bytes(data)) is None


def test_entries_take_a_header_page_and_whole_pages() -> None:
    assert [entry_bytes(n) for n in (1, 4096, 4097)] == [8192, 8192, 12288]


def kv_like(numel: int) -> memoryview:
    values = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return values.view(torch.uint8).numpy().data


def test_zstd_round_trips_through_byte_planes() -> None:
    raw = kv_like(64 * 1024)
    codec = ZstdCodec(planes=2)
    stored = codec.encode(raw)
    assert stored is not None and len(stored) < len(raw)
    out = bytearray(len(raw))
    assert codec.decode_into(memoryview(stored), 2, memoryview(out))
    assert bytes(out) == bytes(raw)


def test_byte_planes_compress_kv_better_than_plain_zstd() -> None:
    raw = kv_like(64 * 1024)
    split, plain = ZstdCodec(planes=2).encode(raw), ZstdCodec(planes=1).encode(raw)
    assert split is not None and plain is not None and len(split) < len(plain)


def test_incompressible_data_is_left_raw_and_garbage_does_not_decode() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8)
    codec = ZstdCodec(planes=2)
    assert codec.encode(noise.data) is None
    assert not codec.decode_into(memoryview(b"not zstd at all"), 2, memoryview(bytearray(64)))
