"""``kvtier bench alternatives`` on a tiny model: every alternative serves the workload, side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.bench.alternatives import LmdbBlockStore, run_alternatives, unique_blocks, workload
from kvtier.errors import CapacityError
from kvtier.layout import KVLayout
from kvtier_connectors.transformers.models import TINY

NAMES = ["recompute", "safetensors", "lmdb", "kvtier-host", "kvtier-host+disk"]


def test_every_alternative_serves_the_workload_with_the_recompute_logits() -> None:
    records = run_alternatives(conversations=4, turns=2, system_tokens=64, block_tokens=16, model_fields=TINY)
    by_name = {record["alternative"]: record for record in records}
    assert list(by_name) == NAMES
    for record in records:
        assert record["requests"] == 8 and record["identical_logits"] == 8, record
        assert record["ttft_total_s"] > 0 and 0 <= record["hit_ratio"] < 1
    assert by_name["recompute"]["hit_ratio"] == 0 and by_name["recompute"]["disk_bytes"] == 0
    assert by_name["recompute"]["speedup_vs_recompute"] == 1
    # Exact-prefix files reuse only a conversation's own previous turn; blocks also share the system prompt.
    assert 0 < by_name["safetensors"]["hit_ratio"] < by_name["lmdb"]["hit_ratio"]
    assert by_name["kvtier-host+disk"]["hit_ratio"] == by_name["lmdb"]["hit_ratio"]
    for name in ("safetensors", "lmdb", "kvtier-host+disk"):
        assert by_name[name]["disk_bytes"] > 0 and by_name[name]["disk_allocated_bytes"] > 0, name
    host_only = by_name["kvtier-host"]
    assert host_only["disk_bytes"] == 0 and host_only["hit_ratio"] < by_name["lmdb"]["hit_ratio"]


def test_workload_turns_grow_from_one_system_prompt() -> None:
    prompts = workload(conversations=2, turns=2, system_tokens=32, vocab_size=100, seed=1)
    assert len(prompts) == 4 and torch.equal(prompts[0][:, :32], prompts[1][:, :32])
    assert torch.equal(prompts[2][:, : prompts[0].shape[1]], prompts[0])  # conversation 0's next turn
    assert unique_blocks(prompts[:1], 16) == prompts[0].shape[1] // 16


def test_lmdb_store_reserves_commits_and_reads_back(tmp_path: Path) -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_tokens=2)
    store = LmdbBlockStore(tmp_path, layout, 2**24, "sha256")
    keys = [bytes([i]) * 16 for i in range(3)]
    reservation = store.reserve(keys[:2])
    for i, slot in enumerate(reservation.slots):
        store.slot_view(slot).fill_(float(i + 1))
    store.commit(store.reserve([]))
    store.commit(reservation)
    aborted = store.reserve(keys[2:])
    store.abort(aborted)
    assert store.reserve(keys).skipped == tuple(keys[:2])
    assert store.lookup(keys).num_blocks == 2
    lease = store.acquire(keys)
    assert lease.keys == tuple(keys[:2])
    assert [float(store.slot_view(slot)[0]) for slot in lease.slots] == [1.0, 2.0]
    store.release(lease)
    assert store.reserve(keys[2:]).slots == lease.slots[-1:]  # a released row is staging for the next call
    with pytest.raises(CapacityError):
        store.reserve([bytes([9, i]) * 8 for i in range(64)])
    assert store.disk_bytes()[0] > 0
    store.close()
