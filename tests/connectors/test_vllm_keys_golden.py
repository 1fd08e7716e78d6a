"""Known answers for the vLLM connector's chunk keys: a change of construction would orphan every stored chunk.

Derived here independently (``hashlib`` by hand, from the documented construction: a root of the domain
tag and the kvtier namespace, salted with the page format and tenant; a key per vLLM chunk hash) and
pinned as literals.
"""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from kvtier.layout import KVLayout  # noqa: E402
from kvtier_connectors.vllm.settings import ChunkKeys, ConnectorSettings, VllmGeometry  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=16)
GEOMETRY = VllmGeometry(layer_names=("a", "b"), vllm_block_tokens=16, hash_block_tokens=16, num_blocks=8,
                        page_format="LBNHC")
CHUNK_HASH = hashlib.sha256(b"chunk-0").digest()  # stands for vLLM's hash of a block (bytes)


def length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "little") + part for part in parts)


def by_hand(tp_rank: int, tp_size: int, salt: bytes) -> bytes:
    namespace = length_prefixed(b"kvtier-ns-v1", b"org/model", LAYOUT.fingerprint.encode(), str(tp_rank).encode(),
                                str(tp_size).encode(), salt)
    root = hashlib.sha256(b"kvtier-vllm-chunk-v1" + namespace).digest()
    return hashlib.sha256(root + CHUNK_HASH).digest()[:16]


def test_chunk_keys_are_known() -> None:
    assert LAYOUT.fingerprint == "e4c41e5a620b3a44"
    expected = by_hand(0, 1, b"vllm:LBNHC")
    assert expected.hex() == "4a71185ca51f8963e13c87146b43b7a9"
    keys = ChunkKeys(ConnectorSettings(model_id="org/model"), LAYOUT, GEOMETRY)
    assert keys.key(CHUNK_HASH) == expected and keys.keys([CHUNK_HASH]) == [expected]


def test_chunk_keys_of_a_shard_and_a_tenant_are_known() -> None:
    expected = by_hand(1, 2, b"vllm:LBNHC:t1")
    assert expected.hex() == "2867147a5ebb7615343a1c44f134ca8d"
    keys = ChunkKeys(ConnectorSettings(model_id="org/model", tenant_salt="t1"), LAYOUT, GEOMETRY, tp_rank=1,
                     tp_size=2)
    assert keys.key(CHUNK_HASH) == expected


def test_a_chunk_is_named_by_its_last_hash_block() -> None:
    geometry = VllmGeometry(layer_names=("a", "b"), vllm_block_tokens=16, hash_block_tokens=8, num_blocks=8,
                            page_format="LBNHC")
    keys = ChunkKeys(ConnectorSettings(model_id="org/model"), LAYOUT, geometry)
    hashes = [bytes([i]) * 32 for i in range(5)]
    assert keys.num_chunks(hashes) == 2
    assert keys.chunk_hash(hashes, 0) == hashes[1] and keys.chunk_hash(hashes, 1) == hashes[3]
