"""kvtier keys derived from vLLM's block hashes: the same in every process, distinct across namespaces."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import hash_block_tokens, init_none_hash  # noqa: E402

from kvtier.errors import ConfigError  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier_connectors.vllm.settings import (  # noqa: E402
    ChunkKeys,
    ConnectorSettings,
    VllmGeometry,
    drafts_over_next_token,
    kv_head_replicas,
)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=16)
GEOMETRY = VllmGeometry(layer_names=("a", "b"), vllm_block_tokens=16, hash_block_tokens=16, num_blocks=8,
                        page_format="LBNHC")
SETTINGS = ConnectorSettings(model_id="org/model")

KEYS_SCRIPT = """
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import hash_block_tokens, init_none_hash
from kvtier.layout import KVLayout
from kvtier_connectors.vllm.settings import ChunkKeys, ConnectorSettings, VllmGeometry
init_none_hash(sha256)
parent = None
hashes = []
for block in range(3):
    parent = hash_block_tokens(sha256, parent, list(range(block * 16, block * 16 + 16)))
    hashes.append(parent)
layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=16)
geometry = VllmGeometry(layer_names=("a", "b"), vllm_block_tokens=16, hash_block_tokens=16, num_blocks=8,
                        page_format="LBNHC")
keys = ChunkKeys(ConnectorSettings(model_id="org/model"), layout, geometry)
print(",".join(keys.key(h).hex() for h in hashes))
"""


def vllm_hashes(num_blocks: int) -> list[bytes]:
    init_none_hash(sha256)
    parent = None
    hashes = []
    for block in range(num_blocks):
        parent = hash_block_tokens(sha256, parent, list(range(block * 16, block * 16 + 16)))
        hashes.append(parent)
    return hashes


def test_another_process_derives_the_same_keys() -> None:
    # The child inherits PYTHONHASHSEED (set or unset), as every process of a deployment must.
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    child = subprocess.run([sys.executable, "-c", KEYS_SCRIPT], env=env, capture_output=True, text=True,
                           timeout=300, check=True)
    keys = ChunkKeys(SETTINGS, LAYOUT, GEOMETRY)
    assert child.stdout.strip().splitlines()[-1] == ",".join(keys.key(h).hex() for h in vllm_hashes(3))


def test_keys_differ_across_models_layouts_page_formats_ranks_and_tenants() -> None:
    chunk_hash = vllm_hashes(1)[0]
    variants = [
        ChunkKeys(SETTINGS, LAYOUT, GEOMETRY),
        ChunkKeys(replace(SETTINGS, model_id="org/other"), LAYOUT, GEOMETRY),
        ChunkKeys(SETTINGS, replace(LAYOUT, dtype="float16"), GEOMETRY),
        ChunkKeys(SETTINGS, LAYOUT, replace(GEOMETRY, page_format="LBHNC")),
        ChunkKeys(SETTINGS, LAYOUT, GEOMETRY, tp_rank=1, tp_size=2),
        ChunkKeys(replace(SETTINGS, tenant_salt="tenant-b"), LAYOUT, GEOMETRY),
    ]
    keys = [variant.key(chunk_hash) for variant in variants]
    assert len(set(keys)) == len(keys)
    assert all(len(key) == 16 for key in keys)
    assert ChunkKeys(SETTINGS, LAYOUT, GEOMETRY).key(chunk_hash) == keys[0]


def test_a_chunk_is_named_by_the_hash_of_its_last_vllm_block() -> None:
    hashes = vllm_hashes(4)
    keys = ChunkKeys(SETTINGS, replace(LAYOUT, block_tokens=32), GEOMETRY)
    assert keys.num_chunks(hashes) == 2
    assert keys.num_chunks(hashes[:3]) == 1
    assert [keys.chunk_hash(hashes, c) for c in range(2)] == [hashes[1], hashes[3]]


def test_ranks_holding_one_kv_head_share_its_key_and_one_writes() -> None:
    """Four ranks over two KV heads: ranks 0-1 hold head 0, ranks 2-3 head 1 (vLLM's replication)."""
    assert kv_head_replicas(2, 4) == 2 and kv_head_replicas(8, 4) == 1 and kv_head_replicas(4, 4) == 1
    ranks = [ChunkKeys(SETTINGS, LAYOUT, GEOMETRY, rank, 4, kv_replicas=2) for rank in range(4)]
    chunk_hash = b"\x01" * 32
    assert ranks[0].key(chunk_hash) == ranks[1].key(chunk_hash) != ranks[2].key(chunk_hash) == ranks[3].key(chunk_hash)
    assert [keys.writer for keys in ranks] == [True, False, True, False]
    assert [keys.key_rank for keys in ranks] == [0, 0, 1, 1] and ranks[0].num_key_ranks == 2
    # The keys name the KV a rank holds: those of TP=2 over the same two heads.
    assert ranks[2].key(chunk_hash) == ChunkKeys(SETTINGS, LAYOUT, GEOMETRY, 1, 2).key(chunk_hash)


def test_replication_that_cannot_be_even_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a multiple"):
        kv_head_replicas(3, 4)
    with pytest.raises(ConfigError, match="do not divide"):
        ChunkKeys(SETTINGS, LAYOUT, GEOMETRY, 0, 4, kv_replicas=3)


def test_drafters_over_the_next_token_are_told_apart() -> None:
    assert not drafts_over_next_token(None)
    # vLLM 0.33 says it itself (DFlash-style drafters need no drop); 0.32 only has use_eagle.
    assert not drafts_over_next_token(SimpleNamespace(needs_eagle_block_drop=lambda: False, use_eagle=lambda: True))
    assert drafts_over_next_token(SimpleNamespace(use_eagle=lambda: True))
    assert not drafts_over_next_token(SimpleNamespace(use_eagle=lambda: False))
