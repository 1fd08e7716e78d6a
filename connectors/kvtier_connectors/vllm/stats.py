"""What the vLLM connector reports through vLLM: transfer counters and KV cache events.

Promises:
- ``KvtierStats`` carries chunk counters (``loaded_chunks``, ``failed_chunks``, ``saved_chunks``) from the
  workers to vLLM's logger; ``aggregate`` sums them over workers and intervals, ``reduce`` gives the sums.
- ``chunk_stored_event`` is the ``BlockStored`` event of one chunk the connector saves: vLLM's hashes of the
  chunk's hash blocks, its tokens, medium ``CPU``, so that a KV-aware router learns the host tier's content;
  ``chunks_removed_event`` is the ``BlockRemoved`` event (medium ``CPU``) of chunks the store no longer holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_COUNTERS = ("loaded_chunks", "failed_chunks", "saved_chunks")


@dataclass
class KvtierStats(KVConnectorStats):
    """Chunk counters of one interval."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in _COUNTERS:
            self.data[name] = int(self.data.get(name, 0)) + int(other.data.get(name, 0))
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: int(self.data.get(name, 0)) for name in _COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in _COUNTERS)


def chunk_stored_event(request: Any, chunk: int, hashes_per_chunk: int, hash_block_tokens: int) -> BlockStored:
    """The ``BlockStored`` event of chunk ``chunk`` of ``request`` (``hashes_per_chunk`` hash blocks)."""
    first = chunk * hashes_per_chunk
    hashes = list(request.block_hashes[first : first + hashes_per_chunk])
    tokens = list(request.all_token_ids[first * hash_block_tokens : (first + hashes_per_chunk) * hash_block_tokens])
    return BlockStored(block_hashes=hashes, parent_block_hash=request.block_hashes[first - 1] if first else None,
                       token_ids=tokens, block_size=hash_block_tokens, lora_id=None, medium="CPU", lora_name=None)


def chunks_removed_event(block_hashes: list[Any]) -> BlockRemoved:
    """The ``BlockRemoved`` event of chunks whose vLLM block hashes are ``block_hashes``."""
    return BlockRemoved(block_hashes=block_hashes, medium="CPU")
