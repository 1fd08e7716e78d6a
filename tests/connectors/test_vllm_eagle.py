"""EAGLE drafters under vLLM's real Scheduler (issue 18 item 9): a drafter's KV at position ``p`` is computed
over the token at ``p + 1``, which the chunk hashes (ending at ``p``) do not name.

The engine runs with a real EAGLE ``SpeculativeConfig``; the harness's last layer stands for the drafter's
(its KV over the next token). A hit ends one token short of its last chunk, so vLLM computes the drafter's
KV there over the reader's own next token; while a request decodes, the chunk holding its newest tokens is
not saved (vLLM rewrites the drafter's KV there when speculated tokens are rejected).
"""

from __future__ import annotations

from pathlib import Path

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
from vllm_harness import BLOCK, LAYERS, Engine  # noqa: E402

__all__ = ["engines", "model_config"]  # fixtures used here


def test_a_hit_leaves_the_drafters_kv_at_its_end_to_the_reader(model_config: ModelConfig, engines: list[Engine],
                                                               tmp_path: Path) -> None:
    engine, _ = make_engine(model_config, engines, eagle_draft=tmp_path / "draft")
    assert engine.draft_layer == len(LAYERS) - 1
    common = prompt(41, 3 * BLOCK)
    store_prefix_then_forget(engine, [*common, 101, 102])
    tokens = [*common, 201, 202]  # the same three chunks, another next token after them
    reader = engine.add("reader", tokens)
    output = engine.step()
    # The three chunks load, and vLLM computes from the last token of the third on.
    assert output.num_scheduled_tokens["reader"] == len(tokens) - (3 * BLOCK - 1)
    for layer_index in range(len(LAYERS)):
        assert engine.kv_of("reader", len(tokens), layer_index) == engine.expected_kv(tokens, layer_index)
    engine.run_until_done(reader)


def test_the_chunk_of_the_newest_decoded_tokens_is_not_saved(model_config: ModelConfig, engines: list[Engine],
                                                             tmp_path: Path) -> None:
    engine, store = make_engine(model_config, engines, eagle_draft=tmp_path / "draft")
    tokens = prompt(42, 2 * BLOCK + 1)
    request = engine.add("writer", tokens, max_tokens=2 * BLOCK + 4)
    engine.run_until_done(request)
    # Decoded up to 4 * BLOCK + 4 tokens: chunk 2 was saved once a chunk past it was computed, chunk 3 never.
    decoded = [*tokens, *request.output_token_ids]
    assert len(decoded) == 4 * BLOCK + 5
    held, wrong = stored_chunks(engine, store, decoded)
    assert not wrong
    assert held == [0, 1, 2]
    assert store.lookup([chunk_key(engine, decoded, 3)], prefetch=False).num_blocks == 0
