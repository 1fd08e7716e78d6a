"""What the scheduler-side connector tells the workers each step: which chunks to load and which to save.

Promises:
- A chunk is one kvtier block: ``pages_per_chunk`` consecutive vLLM blocks of every layer. Specs name chunks
  by vLLM's chained hash of their last hash block (``chunk_hashes``); each worker maps those to its own
  rank's keys, so one metadata object serves every rank.
- A ``SaveSpec``'s ``block_ids`` lists ``pages_per_chunk`` vLLM block ids per chunk, in token order.
- A ``LoadSpec`` restores its chunks' pages ``first_page, first_page + 1, ...`` into ``block_ids[0], [1], ...``
  (vLLM may already hold the leading pages of the first chunk, and may take fewer tokens than the last chunk
  holds, so the pages restored are a window of the chunks' pages).
- Specs are plain data (picklable): vLLM sends the metadata to worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadSpec:
    req_id: str
    chunk_hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]
    first_page: int
    is_async: bool


@dataclass(frozen=True)
class SaveSpec:
    req_id: str
    chunk_hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
