"""The worker side of the vLLM connector: pages out of vLLM's paged KV into the store, and back.

Promises:
- ``register_kv_caches`` sees each layer's cache as pages on a leading block dimension (any shape, any
  in-page order, as ``kvtier.native.byte_rows`` reads it; a K/V pair of planes on a leading dim of 2, as
  older vLLM releases had, is two segments). It checks that ``pages_per_chunk`` pages of every layer make
  exactly one kvtier block and raises ``LayoutMismatchError`` saying what it found otherwise.
- Loads: a synchronous load is fetched from the store in ``start_load_kv`` and scattered layer by layer,
  each layer in ``wait_for_layer_load`` (any layer the forward did not wait for is scattered in
  ``wait_for_save``). An asynchronous load (from disk) completes in the background; ``get_finished``
  scatters it and reports its request as received.
- A chunk the store cannot deliver (evicted since the lookup, failed checksum) is never scattered: its
  blocks are reported once by ``get_block_ids_with_load_errors`` (in the step that found them), so that
  vLLM recomputes them.
- Saves: ``save_kv_layer`` gathers each layer's pages of the step's chunks into a staging buffer as the
  forward produces them; ``wait_for_save`` gathers what is left and hands the chunks to the store (on
  CUDA, once the gather kernels finished, without blocking the step). ``get_finished`` reports a finished
  request as sent once every save of it completed (failed puts are misses later, never errors).
- ``shutdown`` waits for every queued copy and releases the store.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from kvtier.errors import LayoutMismatchError
from kvtier.job import Job
from kvtier.layout import KVLayout
from kvtier.native import PagedKV, byte_rows
from kvtier_connectors.vllm.metadata import KvtierMetadata, LoadSpec, SaveSpec
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, VllmGeometry


@dataclass
class _Load:
    spec: LoadSpec
    staging: torch.Tensor
    job: Job
    ids: list[int] = field(default_factory=list)
    pages: torch.Tensor | None = None


@dataclass
class _Save:
    specs: list[SaveSpec]
    staging: torch.Tensor
    ready: torch.cuda.Event | None
    jobs: list[tuple[str, Job]] = field(default_factory=list)


def layer_segments(cache: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    """One layer's cache as byte-row segments: blocks on dim 0, or K and V planes on dim 0 over blocks on dim 1.

    A leading dim of 2 is read as K/V planes only when there are more than 2 blocks (else it is ambiguous).
    """
    if cache.dim() >= 2 and cache.shape[0] == 2 and cache.shape[1] % num_blocks == 0 and num_blocks > 2:
        return [byte_rows(cache[0], num_blocks), byte_rows(cache[1], num_blocks)]
    return [byte_rows(cache, num_blocks)]


class WorkerSide:
    """The worker-side connector's state; see the module promises."""

    def __init__(self, layout: KVLayout, geometry: VllmGeometry, store: BlockStore, keys: ChunkKeys) -> None:
        self.layout = layout
        self.geometry = geometry
        self.store = store
        self.keys = keys
        self.pages_per_chunk = layout.block_tokens // geometry.vllm_block_tokens
        self.paged: PagedKV | None = None
        self._layer_segments: dict[str, range] = {}
        self._step_loads: list[_Load] = []
        self._loads_fetched = False
        self._layers_loaded: set[str] = set()
        self._step_save: _Save | None = None
        self._layers_saved: set[str] = set()
        self._async_loads: dict[str, _Load] = {}
        self._saves: list[_Save] = []
        self._save_jobs: defaultdict[str, list[Job]] = defaultdict(list)
        self._finished_waiting: set[str] = set()
        self._load_errors: set[int] = set()
        # Pinned staging read by scatter kernels still queued on the GPU, kept alive until they ran.
        self._in_flight: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    # -- registration -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.geometry.layer_names if name not in kv_caches]
        if missing:
            raise LayoutMismatchError(f"vLLM registered no KV cache for layer(s) {missing}")
        segments: list[torch.Tensor] = []
        for name in self.geometry.layer_names:
            cache = kv_caches[name]
            try:
                found = layer_segments(cache, self.geometry.num_blocks)
            except ValueError as exc:
                raise LayoutMismatchError(
                    f"layer {name}: cannot read its cache {tuple(cache.shape)} {cache.dtype} (strides "
                    f"{cache.stride()}) as {self.geometry.num_blocks} pages on a leading block dimension: {exc}"
                ) from exc
            self._layer_segments[name] = range(len(segments), len(segments) + len(found))
            segments.extend(found)
        try:
            paged = PagedKV(segments)
        except ValueError as exc:
            shapes = {name: tuple(kv_caches[name].shape) for name in self.geometry.layer_names}
            raise LayoutMismatchError(f"the layers' pages differ ({exc}); caches: {shapes}") from exc
        if paged.chunk_bytes(self.pages_per_chunk) != self.layout.block_bytes:
            raise LayoutMismatchError(
                f"{self.pages_per_chunk} vLLM block(s) of {len(segments)} segments of {paged.page_bytes} B make "
                f"{paged.chunk_bytes(self.pages_per_chunk)} B, but a kvtier block of {self.layout} is "
                f"{self.layout.block_bytes} B: vLLM pads or packs its pages in a way kvtier does not store"
            )
        self.paged = paged

    def _require_paged(self) -> PagedKV:
        if self.paged is None:
            raise LayoutMismatchError("register_kv_caches was not called before the first transfer")
        return self.paged

    def _staging(self, num_chunks: int) -> torch.Tensor:
        pinned = self._require_paged().device.type == "cuda"
        return torch.empty(num_chunks * self.layout.block_bytes, dtype=torch.uint8, pin_memory=pinned)

    def _chunk_views(self, staging: torch.Tensor, first: int, count: int) -> list[torch.Tensor]:
        size = self.layout.block_bytes
        return [staging[(first + i) * size : (first + i + 1) * size].view(self.layout.torch_dtype)
                for i in range(count)]

    # -- loads --------------------------------------------------------------------------------------

    def start_load_kv(self, meta: KvtierMetadata) -> None:
        for spec in meta.loads:
            count = len(spec.chunk_hashes)
            staging = self._staging(count)
            job = self.store.get(self.keys.keys(spec.chunk_hashes), self._chunk_views(staging, 0, count))
            load = _Load(spec, staging, job)
            if spec.is_async:
                self._async_loads[spec.req_id] = load
            else:
                self._step_loads.append(load)

    def _fetch(self, load: _Load) -> None:
        """Wait for the store's copy, report what failed, and lay the good pages out for a scatter."""
        failed = set(load.job.wait().failed)
        m, spec = self.pages_per_chunk, load.spec
        paged = self._require_paged()
        keep = []
        for i, block_id in enumerate(spec.block_ids):
            if (spec.first_page + i) // m in failed:
                self._load_errors.add(block_id)
            else:
                keep.append(i)
        load.ids = [spec.block_ids[i] for i in keep]
        # (chunk, segment, page, byte) -> (page, segment, byte): a window of pages is then one slice.
        by_page = load.staging.view(-1, paged.num_segments, m, paged.page_bytes).transpose(1, 2)
        by_page = by_page.reshape(-1, paged.num_segments, paged.page_bytes)
        pages = by_page.index_select(0, torch.tensor([spec.first_page + i for i in keep], dtype=torch.int64))
        load.pages = pages.pin_memory() if paged.device.type == "cuda" else pages

    def _scatter(self, load: _Load, segments: range | None) -> None:
        if load.pages is None or not load.ids:
            return
        paged = self._require_paged()
        paged.scatter(load.ids, load.pages.view(-1), pages_per_chunk=1, segments=segments)
        if paged.device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
            self._in_flight.append((event, load.pages))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._step_loads or layer_name in self._layers_loaded or layer_name not in self._layer_segments:
            return
        if not self._loads_fetched:
            for load in self._step_loads:
                self._fetch(load)
            self._loads_fetched = True
        for load in self._step_loads:
            self._scatter(load, self._layer_segments[layer_name])
        self._layers_loaded.add(layer_name)

    def _finish_step_loads(self) -> None:
        for name in self.geometry.layer_names:
            self.wait_for_layer_load(name)
        self._step_loads, self._loads_fetched, self._layers_loaded = [], False, set()

    # -- saves --------------------------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, meta: KvtierMetadata) -> None:
        if not meta.saves or layer_name in self._layers_saved or layer_name not in self._layer_segments:
            return
        paged = self._require_paged()
        if self._step_save is None:
            num_chunks = sum(len(spec.chunk_hashes) for spec in meta.saves)
            self._step_save = _Save(list(meta.saves), self._staging(num_chunks), None)
        block_ids = [b for spec in self._step_save.specs for b in spec.block_ids]
        paged.gather(block_ids, self._step_save.staging, self.pages_per_chunk, self._layer_segments[layer_name])
        self._layers_saved.add(layer_name)

    def wait_for_save(self, meta: KvtierMetadata) -> None:
        self._finish_step_loads()
        for name in self.geometry.layer_names:
            self.save_kv_layer(name, meta)
        save, self._step_save, self._layers_saved = self._step_save, None, set()
        if save is None:
            return
        if self._require_paged().device.type == "cuda":
            save.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            save.ready.record()
        self._saves.append(save)
        self._submit_ready_saves()

    def _submit_ready_saves(self) -> None:
        for save in self._saves:
            if save.jobs or (save.ready is not None and not save.ready.query()):  # type: ignore[no-untyped-call]
                continue
            first = 0
            for spec in save.specs:
                count = len(spec.chunk_hashes)
                job = self.store.put(self.keys.keys(spec.chunk_hashes), self._chunk_views(save.staging, first, count))
                save.jobs.append((spec.req_id, job))
                self._save_jobs[spec.req_id].append(job)
                first += count

    # -- completions --------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._submit_ready_saves()
        self._saves = [save for save in self._saves if not save.jobs or not all(j.done() for _, j in save.jobs)]
        self._in_flight = [(event, pages) for event, pages in self._in_flight if not event.query()]  # type: ignore[no-untyped-call]
        self._finished_waiting |= finished_req_ids & self._save_jobs.keys()
        pending_saves = {spec.req_id for save in self._saves if not save.jobs for spec in save.specs}
        sent = {req_id for req_id in self._finished_waiting
                if req_id not in pending_saves and all(job.done() for job in self._save_jobs[req_id])}
        for req_id in sent:
            del self._save_jobs[req_id]
        self._finished_waiting -= sent
        received = set()
        for req_id, load in list(self._async_loads.items()):
            if load.job.done():
                self._fetch(load)
                self._scatter(load, None)
                received.add(req_id)
                del self._async_loads[req_id]
        return sent or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._submit_ready_saves()
        for save in self._saves:
            if save.ready is not None:
                save.ready.synchronize()
        self._submit_ready_saves()
        for jobs in self._save_jobs.values():
            for job in jobs:
                job.wait()
        for load in self._async_loads.values():
            load.job.wait()
        if self._in_flight:
            torch.cuda.synchronize()
        self._saves, self._save_jobs, self._async_loads, self._in_flight = [], defaultdict(list), {}, []
