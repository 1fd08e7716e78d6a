"""The scheduler side of the vLLM connector: how many tokens kvtier can supply, and what each step moves.

Promises:
- ``get_num_new_matched_tokens`` counts the longest run of whole chunks present in the store right after
  what vLLM already holds, never the prompt's last token (vLLM must compute at least one). The load is
  asynchronous when any of those chunks is on disk (the lookup has already started reading it into host
  memory), synchronous otherwise. In a tensor-parallel deployment the hit is the shortest over all ranks.
- ``update_state_after_alloc`` turns the hit into a ``LoadSpec`` over the blocks vLLM allocated; it is sent
  in the next ``build_connector_meta``.
- ``build_connector_meta`` also asks for a save of every chunk that becomes whole (all its tokens computed
  and hashed) in the step, unless the store already holds it.
- ``request_finished`` returns True when a save of the request was ever sent to the workers: vLLM then
  keeps its blocks until a worker reports the request in ``finished_sending`` (all its saves completed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.layout import KVLayout
from kvtier.store import Tier
from kvtier_connectors.vllm.metadata import KvtierMetadata, LoadSpec, SaveSpec
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, ConnectorSettings, VllmGeometry


@dataclass
class _Hit:
    start_tokens: int
    end_tokens: int
    is_async: bool


@dataclass
class _Tracked:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    next_chunk: int = 0
    saved: bool = False


class SchedulerSide:
    """Per-request bookkeeping of the scheduler-side connector; see the module promises."""

    def __init__(self, settings: ConnectorSettings, layout: KVLayout, geometry: VllmGeometry, store: BlockStore,
                 tp_size: int) -> None:
        self.store = store
        self.block_tokens = layout.block_tokens
        self.vllm_block_tokens = geometry.vllm_block_tokens
        self.pages_per_chunk = layout.block_tokens // geometry.vllm_block_tokens
        self.rank_keys = [ChunkKeys(settings, layout, geometry, rank, tp_size) for rank in range(tp_size)]
        self._requests: dict[str, _Tracked] = {}
        self._hits: dict[str, _Hit] = {}
        self._loads: list[LoadSpec] = []
        self._from_disk: dict[str, bool] = {}

    # -- admission ----------------------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = _Tracked(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self._requests.setdefault(request.request_id, _Tracked(request))
        hashes = request.block_hashes
        keys0 = self.rank_keys[0]
        usable_chunks = min(keys0.num_chunks(hashes), (request.num_tokens - 1) // self.block_tokens)
        first_chunk = num_computed_tokens // self.block_tokens
        if usable_chunks <= first_chunk:
            return 0, False
        chunk_hashes = [keys0.chunk_hash(hashes, c) for c in range(first_chunk, usable_chunks)]
        num_hit, is_async = len(chunk_hashes), False
        for keys in self.rank_keys:
            found = self.store.lookup(keys.keys(chunk_hashes[:num_hit]))
            num_hit = found.num_blocks
            is_async = is_async or any(tier is not Tier.HOST for tier in found.tiers)
        end_tokens = (first_chunk + num_hit) * self.block_tokens
        if end_tokens <= num_computed_tokens:
            self._hits.pop(request.request_id, None)
            return 0, False
        self._hits[request.request_id] = _Hit(num_computed_tokens, end_tokens, is_async)
        return end_tokens - num_computed_tokens, is_async

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        hit = self._hits.pop(request.request_id, None)
        if hit is None or num_external_tokens == 0:
            return
        end_tokens = hit.start_tokens + num_external_tokens
        first_chunk = hit.start_tokens // self.block_tokens
        last_chunk = -(-end_tokens // self.block_tokens)
        keys0 = self.rank_keys[0]
        chunk_hashes = tuple(keys0.chunk_hash(request.block_hashes, c) for c in range(first_chunk, last_chunk))
        first_page_id = first_chunk * self.pages_per_chunk
        first_page = hit.start_tokens // self.vllm_block_tokens - first_page_id
        end_page_id = -(-end_tokens // self.vllm_block_tokens)
        block_ids_to_fill = tuple(block_ids[first_page_id + first_page : end_page_id])
        self._loads.append(LoadSpec(request.request_id, chunk_hashes, block_ids_to_fill, first_page, hit.is_async))
        self._from_disk[request.request_id] = hit.is_async

    def load_came_from_disk(self, request: Any) -> bool:
        """Whether the request's last planned load needed the disk tier (an asynchronous load)."""
        return self._from_disk.get(request.request_id, False)

    # -- each step ----------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> KvtierMetadata:
        meta = KvtierMetadata(loads=self._loads)
        self._loads = []
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan_saves(meta, tracked, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[index] + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            self._plan_saves(meta, tracked, computed)
        return meta

    def _plan_saves(self, meta: KvtierMetadata, tracked: _Tracked, computed_tokens: int) -> None:
        keys0 = self.rank_keys[0]
        hashes = tracked.request.block_hashes
        whole_chunks = min(computed_tokens // self.block_tokens, keys0.num_chunks(hashes),
                           len(tracked.block_ids) // self.pages_per_chunk)
        chunks = range(tracked.next_chunk, whole_chunks)
        if not chunks:
            return
        tracked.next_chunk = whole_chunks
        chunk_hashes = [keys0.chunk_hash(hashes, c) for c in chunks]
        # The store is shared by the ranks, so rank 0's keys say which chunks are already there.
        missing = [i for i, key in enumerate(keys0.keys(chunk_hashes)) if self.store.contains(key) is None]
        if not missing:
            return
        m = self.pages_per_chunk
        block_ids = tuple(b for i in missing for b in tracked.block_ids[chunks[i] * m : (chunks[i] + 1) * m])
        meta.saves.append(SaveSpec(tracked.request.request_id, tuple(chunk_hashes[i] for i in missing), block_ids))
        tracked.saved = True

    def request_finished(self, request: Any) -> bool:
        self._hits.pop(request.request_id, None)
        self._from_disk.pop(request.request_id, None)
        # A load planned for a request that ends before the next step must not write into freed blocks.
        self._loads = [spec for spec in self._loads if spec.req_id != request.request_id]
        tracked = self._requests.pop(request.request_id, None)
        return tracked is not None and tracked.saved
