"""Known answers for what persists: block keys, the layout fingerprint and the on-disk entry header.

Each value is derived here independently (``hashlib``, ``json``, ``struct`` and ``xxhash`` by hand, from
the documented construction) and pinned as a literal: a change of construction, byte order, field order
or hash would make every stored block unreachable or misread, so it must fail here and bump
``FORMAT_VERSION`` or the key namespace's version on purpose.
"""

from __future__ import annotations

import hashlib
import json

import xxhash

from kvtier.disk.format import FORMAT_VERSION, HEADER_BYTES, EntryHeader, pack_header, parse_header
from kvtier.keys import BlockHasher, Namespace
from kvtier.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=4)
TOKENS = list(range(1000, 1010))  # two whole blocks of 4 and a partial one


def by_hand_fingerprint() -> str:
    fields = {"v": 1, "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "bfloat16", "block_tokens": 4,
              "kind": "kv"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "little") + part for part in parts)


def test_layout_fingerprint_is_known() -> None:
    assert by_hand_fingerprint() == "74709590c78e2736"
    assert LAYOUT.fingerprint == by_hand_fingerprint()


def test_block_keys_are_known() -> None:
    namespace = length_prefixed(b"kvtier-ns-v1", b"org/model", by_hand_fingerprint().encode(), b"0", b"1", b"")
    key = hashlib.sha256(namespace).digest()[:16]
    expected = []
    for block in range(2):
        tokens = b"".join(t.to_bytes(4, "little") for t in TOKENS[block * 4 : block * 4 + 4])
        key = hashlib.sha256(key + tokens).digest()[:16]
        expected.append(key)
    assert [k.hex() for k in expected] == ["d132dd5243641536d114c5b502cf4b04", "809191f5c0fab50c35108ff61d2a0a89"]
    hasher = BlockHasher(Namespace.for_layout("org/model", LAYOUT), 4)
    assert hasher.keys(TOKENS) == expected  # the partial third block gets no key
    assert hasher.extend(expected[0], TOKENS[4:8]) == expected[1:]


def test_block_keys_of_a_shard_and_a_tenant_are_known() -> None:
    namespace = length_prefixed(b"kvtier-ns-v1", b"org/model", by_hand_fingerprint().encode(), b"1", b"2", b"acme")
    root = hashlib.sha256(namespace).digest()[:16]
    first = hashlib.sha256(root + b"".join(t.to_bytes(4, "little") for t in TOKENS[:4])).digest()[:16]
    hasher = BlockHasher(Namespace.for_layout("org/model", LAYOUT, tp_rank=1, tp_size=2, tenant_salt="acme"), 4)
    assert hasher.keys(TOKENS[:4]) == [first]


def test_entry_header_is_known() -> None:
    key = bytes(range(16))
    header = EntryHeader(key=key, codec=1, planes=2, stored_len=1000, raw_len=4096,
                         payload_checksum=0x0123456789ABCDEF)
    # magic, version u16, codec u8, planes u8, key, stored_len u32, raw_len u32, checksum u64, little-endian
    body = (b"KVTE" + FORMAT_VERSION.to_bytes(2, "little") + bytes([1, 2]) + key + (1000).to_bytes(4, "little")
            + (4096).to_bytes(4, "little") + (0x0123456789ABCDEF).to_bytes(8, "little"))
    by_hand = body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")
    assert FORMAT_VERSION == 1 and HEADER_BYTES == len(by_hand) == 48
    assert by_hand.hex() == ("4b56544501000102000102030405060708090a0b0c0d0e0fe803000000100000"
                             "efcdab896745230180ebe9bcfbb336ce")
    out = bytearray(4096)
    header_checksum = pack_header(header, memoryview(out))
    assert bytes(out[:HEADER_BYTES]) == by_hand and header_checksum == 0xCE36B3FBBCE9EB80
    assert parse_header(by_hand) == (header, header_checksum)
    assert parse_header(by_hand[:-1] + bytes([by_hand[-1] ^ 1])) is None
