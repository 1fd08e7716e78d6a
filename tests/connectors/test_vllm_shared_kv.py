"""Ranks that hold the same KV, under vLLM's real Scheduler with two tensor-parallel ranks (issue 18 items 2, 9).

KV heads replicated over ranks (more ranks than KV heads) and MLA's latent (the same on every rank) are stored
once, under one key every such rank reads, and written by the first of them only. The commit rule still
covers the ranks that write nothing: a load that fails on rank 1 alone drops rank 0's saves computed after it.
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_vllm_commit_rule import (  # noqa: E402
    chunk_key,
    engines,
    make_engine,
    model_config,
    prompt,
    store_prefix_then_forget,
    stored_chunks,
)
from vllm.config import ModelConfig  # noqa: E402
from vllm_harness import BLOCK, LAYERS, Engine, write_model_dir  # noqa: E402

from kvtier.store import Store  # noqa: E402

__all__ = ["engines", "model_config"]  # fixtures used here


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    path = write_model_dir(tmp_path_factory.mktemp("one-kv-head"), num_kv_heads=1)
    return ModelConfig(model=str(path), dtype="float32", seed=0, skip_tokenizer_init=True)


def assert_stored_once_and_restored_on_every_rank(engine: Engine, store: Store, tokens: list[int]) -> None:
    """Save ``tokens``' whole chunks (one block each in the store, whatever the ranks), then restore them into
    every rank, value for value what a recompute writes."""
    store_prefix_then_forget(engine, tokens)
    assert store.stats().tiers["host"].used_blocks == len(tokens) // BLOCK
    reader = engine.add("reader", tokens)
    engine.step()
    assert reader.num_computed_tokens == len(tokens)
    for rank in range(engine.tp_size):
        for layer_index in range(len(LAYERS)):
            assert engine.kv_of("reader", len(tokens), layer_index, rank) == \
                engine.expected_kv(tokens, layer_index, rank)
    engine.run_until_done(reader)


def test_replicated_kv_heads_are_stored_once_and_restored_on_every_rank(one_kv_head: ModelConfig,
                                                                         engines: list[Engine]) -> None:
    """One KV head on two ranks: both hold the same KV, so a chunk is one key, one block, one writer."""
    engine, store = make_engine(one_kv_head, engines, tp_size=2, num_kv_heads=1)
    assert engine.kv_replicas == 2
    tokens = prompt(31, 4 * BLOCK + 1)
    assert_stored_once_and_restored_on_every_rank(engine, store, tokens)
    assert all(chunk_key(engine, tokens, c, rank=0) == chunk_key(engine, tokens, c, rank=1) for c in range(4))
    assert sum(data.get("saved_chunks", 0) for data in engine.stats) == 4


def test_keys_of_a_replicated_head_are_those_of_the_rank_that_holds_it_alone(one_kv_head: ModelConfig,
                                                                            engines: list[Engine]) -> None:
    """The key names the KV a rank holds: TP=2 over one KV head shares TP=1's keys (the same KV)."""
    replicated, _ = make_engine(one_kv_head, engines, tp_size=2, num_kv_heads=1)
    alone, _ = make_engine(one_kv_head, engines, tp_size=1, num_kv_heads=1)
    tokens = prompt(32, 2 * BLOCK)
    assert chunk_key(replicated, tokens, 1, rank=1) == chunk_key(alone, tokens, 1)


def test_latent_kv_is_restored_on_every_rank(model_config: ModelConfig, engines: list[Engine]) -> None:
    engine, store = make_engine(model_config, engines, tp_size=2, mla=True)
    assert_stored_once_and_restored_on_every_rank(engine, store, prompt(33, 3 * BLOCK + 1))


def test_a_latent_load_failing_on_the_rank_that_writes_nothing_drops_the_writers_saves(
        model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 2 for MLA: rank 0 loads chunk 1, rank 1 (which never writes) fails it; rank 0's KV computed after
    it depends on rank 1's through the all-reduce, so rank 0's saves over it are dropped, and the recomputed
    chunks saved again."""
    engine, store = make_engine(model_config, engines, tp_size=2, mla=True)
    tokens = prompt(34, 7 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 3 * BLOCK + 1])
    store.failing.add(chunk_key(engine, tokens, 1))
    store.spare_acquires = 1  # rank 0's acquire gets it, rank 1's does not
    victim = engine.add("victim", tokens)
    engine.step()
    assert not store.failing, "the load never failed: the test lost its case"
    engine.run_until_done(victim, timeout_s=30)
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong, f"chunks stored over a failed load: {wrong}"
    assert held == list(range(7))
