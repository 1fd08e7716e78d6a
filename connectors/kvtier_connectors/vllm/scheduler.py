"""The scheduler side of the vLLM connector: how many tokens kvtier can supply, and what each step moves.

Promises:
- ``get_num_new_matched_tokens`` counts the longest run of whole chunks present in the store right after
  what vLLM already holds, never the prompt's last token (vLLM must compute at least one): one ``lookup``
  (one key list, one round trip to a daemon) per rank. The load is asynchronous when any of those chunks is
  on disk (the lookup has already started reading it into host memory) or when the step's synchronous loads
  would pass ``sync_load_bytes``; synchronous otherwise. With tensor parallelism the hit is the shortest
  over all ranks.
- A store that fails (a daemon gone or restarting) is a miss, never an exception inside ``schedule()``.
- ``update_state_after_alloc`` turns the hit into a ``LoadSpec`` over the blocks vLLM allocated; it is sent
  in the next ``build_connector_meta``.
- ``build_connector_meta`` also asks for a save of every chunk that becomes whole (all its tokens computed
  and hashed) in the step, after the leading run the store already holds for every rank (one ``lookup``).
- Blocks vLLM reports as failed loads (``update_connector_output``) rewind the request's save cursor to
  the first chunk they touch, so the chunks vLLM recomputes are saved again (the worker dropped the saves
  computed over them).
- ``request_finished`` never holds a request's blocks (saves are queued on the forward's stream); a
  planned synchronous load of a request that ends before its step is dropped, an asynchronous one is left
  to report (vLLM holds its blocks until then).
- ``reset_cache`` starts a new key epoch: nothing saved before it is found after it.
- ``take_events`` yields a ``BlockStored`` event (medium ``CPU``) per chunk the step asked to save.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import KvtierError
from kvtier.layout import KVLayout
from kvtier.store import LookupResult, Tier
from kvtier_connectors.vllm.metadata import KvtierMetadata
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, ConnectorSettings, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec

log = logging.getLogger(__name__)


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


class SchedulerSide:
    """Per-request bookkeeping of the scheduler-side connector; see the module promises."""

    def __init__(self, settings: ConnectorSettings, layout: KVLayout, geometry: VllmGeometry, store: BlockStore,
                 tp_size: int, make_event: Callable[[Any, int, int, int], Any] | None = None) -> None:
        self.store = store
        self.block_tokens = layout.block_tokens
        self.block_bytes = layout.block_bytes
        self.vllm_block_tokens = geometry.vllm_block_tokens
        self.hash_block_tokens = geometry.hash_block_tokens
        self.pages_per_chunk = layout.block_tokens // geometry.vllm_block_tokens
        self.sync_load_bytes = settings.sync_load_bytes
        # Latent (MLA) KV is the same on every rank and stored once: rank 0's keys stand for all.
        num_key_ranks = 1 if layout.kind == "latent" else tp_size
        self.rank_keys = [ChunkKeys(settings, layout, geometry, rank, tp_size) for rank in range(num_key_ranks)]
        self.key_epoch = ""
        self._make_event = make_event
        self._events: list[Any] = []
        self._requests: dict[str, _Tracked] = {}
        self._hits: dict[str, _Hit] = {}
        self._loads: list[LoadSpec] = []
        self._sync_bytes = 0
        self._from_disk: dict[str, bool] = {}
        self.failed_lookups = 0

    def _lookup(self, keys: ChunkKeys, chunk_hashes: Sequence[bytes], prefetch: bool) -> LookupResult:
        try:
            return self.store.lookup(keys.keys(chunk_hashes), prefetch=prefetch)
        except KvtierError as exc:
            self.failed_lookups += 1
            log.debug("kvtier lookup failed, counted as a miss: %s", exc)
            return LookupResult(0, ())

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
            if not num_hit:
                break
            found = self._lookup(keys, chunk_hashes[:num_hit], prefetch=True)
            num_hit = found.num_blocks
            is_async = is_async or any(tier is not Tier.HOST for tier in found.tiers[:num_hit])
        end_tokens = (first_chunk + num_hit) * self.block_tokens
        if end_tokens <= num_computed_tokens:
            self._hits.pop(request.request_id, None)
            return 0, False
        # Synchronous loads stall the whole batch: past the step's budget a load runs in the background.
        load_bytes = num_hit * self.block_bytes
        if not is_async and self._sync_bytes + load_bytes > self.sync_load_bytes:
            is_async = True
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
        if not hit.is_async:
            self._sync_bytes += len(chunk_hashes) * self.block_bytes

    def load_came_from_disk(self, request: Any) -> bool:
        """Whether the request's last planned load needed the disk tier (an asynchronous load)."""
        return self._from_disk.get(request.request_id, False)

    # -- each step ----------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> KvtierMetadata:
        meta = KvtierMetadata(loads=self._loads, key_epoch=self.key_epoch)
        self._loads, self._sync_bytes = [], 0
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
        # The leading run every rank already holds needs no save (a later gap is deduplicated by reserve).
        held = len(chunk_hashes)
        for keys in self.rank_keys:
            if held:
                held = self._lookup(keys, chunk_hashes[:held], prefetch=False).num_blocks
        if held == len(chunk_hashes):
            return
        m = self.pages_per_chunk
        todo = chunks[held:]
        block_ids = tuple(b for c in todo for b in tracked.block_ids[c * m : (c + 1) * m])
        meta.saves.append(SaveSpec(tracked.request.request_id, tuple(chunk_hashes[held:]), block_ids))
        if self._make_event is not None:
            self._events.extend(self._make_event(tracked.request, c, keys0.hashes_per_chunk, self.hash_block_tokens)
                                for c in todo)

    def rewind_failed_loads(self, invalid_block_ids: set[int]) -> None:
        """Save again, once vLLM recomputed them, the chunks over blocks whose load failed."""
        if not invalid_block_ids:
            return
        for tracked in self._requests.values():
            for index, block_id in enumerate(tracked.block_ids[: tracked.next_chunk * self.pages_per_chunk]):
                if block_id in invalid_block_ids:
                    tracked.next_chunk = index // self.pages_per_chunk
                    break

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> bool:
        """Start a new key epoch: every chunk saved before is out of reach, and running requests save again."""
        self.key_epoch = secrets.token_hex(8)
        self.rank_keys = [keys.with_epoch(self.key_epoch) for keys in self.rank_keys]
        for tracked in self._requests.values():
            tracked.next_chunk = 0
        self._hits.clear()
        self._loads = [spec for spec in self._loads if spec.is_async]
        return True

    def request_finished(self, request: Any) -> bool:
        self._hits.pop(request.request_id, None)
        self._from_disk.pop(request.request_id, None)
        # A synchronous load planned for a request that ends before the next step must not write into freed
        # blocks; an asynchronous one must still run and report, since vLLM holds its blocks until it does.
        self._loads = [spec for spec in self._loads if spec.req_id != request.request_id or spec.is_async]
        self._requests.pop(request.request_id, None)
        return False
