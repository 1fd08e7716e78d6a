"""The worker side of the vLLM connector: pages moved in place between vLLM's paged KV and arena slots.

This module imports no vLLM: a benchmark or a GPU check drives it with caches in vLLM's layouts.

Promises:
- ``register_kv_caches`` sees each layer's cache as pages on a leading block dimension (any shape, any
  in-page order, as ``kvtier.native.byte_rows`` reads it; a K/V pair of planes on a leading dim of 2, as
  older vLLM releases had, is two segments). It checks that ``pages_per_chunk`` pages of every layer make
  exactly one kvtier block and raises ``LayoutMismatchError`` saying what it found otherwise.
- Synchronous loads are complete, or queued on the current stream ahead of anything vLLM queues after it,
  when ``start_load_kv`` returns: the chunks are leased (``acquire``) and scattered from their arena slots
  straight into the paged cache, every layer at once. The forward never reads a page before it is in
  place, whatever the CUDA graph mode (per-layer hooks, skipped by full-graph replays, have nothing to do).
  A lease is released only once its scatter ran (its CUDA event completed; on the CPU the copy is done).
- A chunk the store cannot deliver (evicted since the lookup, failed checksum, daemon gone) is never
  scattered: its blocks are reported by ``get_block_ids_with_load_errors`` in the step that found them,
  and no save of that step for the same request, or over the same blocks, is made (that KV was computed
  over a missing prefix).
- Asynchronous loads (from disk, or over the synchronous budget) acquire in a background thread;
  ``get_finished`` scatters a finished one (queued before the next step's forward) and reports its request
  as received, with its failed blocks reported in the same pass.
- Saves reserve slots for the step's chunks and gather the paged cache straight into them: per layer in
  ``save_kv_layer`` as the forward writes it, the rest in one copy in ``wait_for_save``. Slots are
  committed only once the gathers ran (their CUDA event completed), aborted if they failed. Gathers are
  queued on the forward's stream, so vLLM may free and reuse the blocks at once: saves never hold a
  request (``get_finished`` reports no sends). A full arena or a gone daemon makes a save a later miss.
- No staging buffer, no pinned allocation and no host copy on the way; nothing waits for the device,
  except ``shutdown``, which waits for every queued copy, commits or aborts, and releases every lease.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.errors import KvtierError, LayoutMismatchError
from kvtier.layout import KVLayout
from kvtier.native import PagedKV, byte_rows
from kvtier.store import Lease, Reservation
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec, StepPlan

log = logging.getLogger(__name__)
_EMPTY_LEASE = Lease((), ())


@dataclass
class _StepSave:
    """The slots reserved for one step's saves and the blocks gathered into them, chunk by chunk."""

    reservation: Reservation | None
    block_ids: list[int] = field(default_factory=list)
    layers_done: set[str] = field(default_factory=set)


def copy_page_from_slot(paged: PagedKV, block_id: int, rows: torch.Tensor, slot_id: int, page: int,
                        pages_per_chunk: int) -> None:
    """Copy page ``page`` of the chunk in row ``slot_id`` (``gather_to_slots``'s order) into ``block_id``."""
    width = pages_per_chunk * paged.page_bytes
    chunk = rows[slot_id, : paged.num_segments * width].view(paged.num_segments, pages_per_chunk, paged.page_bytes)
    for index, segment in enumerate(paged.segments):
        segment[block_id].copy_(chunk[index, page], non_blocking=True)


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
        self._step_save: _StepSave | None = None
        self._step_failed_reqs: set[str] = set()
        self._step_failed_blocks: set[int] = set()
        self._async_loads: dict[str, tuple[LoadSpec, Future[Lease]]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-load")
        self._load_errors: set[int] = set()
        # Copies queued on the device and what to do once each ran (commit, abort, release), in order.
        self._pending: list[tuple[torch.cuda.Event | None, Callable[[], None]]] = []
        self.saved_chunks = 0
        self.loaded_chunks = 0
        self.failed_chunks = 0

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

    def _follow(self, plan: StepPlan) -> None:
        if plan.key_epoch != self.keys.epoch:
            self.keys = self.keys.with_epoch(plan.key_epoch)

    def _after_device(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the copies queued so far on the current stream ran (at once on the CPU)."""
        if self._require_paged().device.type != "cuda":
            action()
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._pending.append((event, action))

    def poll(self) -> None:
        """Run the actions of the queued copies that completed, in queue order."""
        done = 0
        for event, action in self._pending:
            if event is not None and not event.query():  # type: ignore[no-untyped-call]
                break
            action()
            done += 1
        del self._pending[:done]

    # -- loads --------------------------------------------------------------------------------------

    def start_load_kv(self, plan: StepPlan) -> None:
        self._follow(plan)
        self.poll()
        for spec in plan.loads:
            if spec.is_async:
                self._async_loads[spec.req_id] = (spec, self._pool.submit(self._acquire, self.keys, spec))
            elif not self._load(spec, self._acquire(self.keys, spec)):
                self._step_failed_reqs.add(spec.req_id)

    def _acquire(self, keys: ChunkKeys, spec: LoadSpec) -> Lease:
        try:
            return self.store.acquire(keys.keys(spec.chunk_hashes))
        except KvtierError as exc:
            log.warning("kvtier load of %d chunk(s) for %s failed, vLLM recomputes them: %s",
                        len(spec.chunk_hashes), spec.req_id, exc)
            return _EMPTY_LEASE

    def _load(self, spec: LoadSpec, lease: Lease) -> bool:
        """Scatter the leased leading chunks of ``spec``; report the rest. True when every chunk loaded."""
        paged, m = self._require_paged(), self.pages_per_chunk
        rows = None
        if lease.slots:
            try:
                # The lease's own arena: after a daemon restart since the acquire its slots are unreadable here.
                rows = self.store.slot_rows(lease)
            except KvtierError as exc:
                log.warning("kvtier load for %s lost its lease, vLLM recomputes it: %s", spec.req_id, exc)
                self._release(lease)
        num_leased = len(lease.slots) if rows is not None else 0
        pages = [(spec.first_page + i, block_id) for i, block_id in enumerate(spec.block_ids)]
        failed = [block_id for page, block_id in pages if page // m >= num_leased]
        self._load_errors.update(failed)
        self._step_failed_blocks.update(failed)
        self.failed_chunks += len(spec.chunk_hashes) - num_leased
        self.loaded_chunks += num_leased
        if rows is not None and num_leased:
            try:
                # The first chunk may be partial (vLLM holds its leading pages): page by page, at most m copies.
                head = [(page, block_id) for page, block_id in pages if page < m] if spec.first_page else []
                for page, block_id in head:
                    copy_page_from_slot(paged, block_id, rows, lease.slots[0], page, m)
                whole = [block_id for page, block_id in pages[len(head):] if page // m < num_leased]
                paged.scatter_from_slots(whole, rows, lease.slots[1 if head else 0 : num_leased], m)
            finally:
                self._after_device(lambda: self._release(lease))
        return not failed

    def _release(self, lease: Lease) -> None:
        try:
            self.store.release(lease)
        except KvtierError as exc:
            log.debug("releasing a lease failed (the daemon drops a lost connection's leases itself): %s", exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: ``start_load_kv`` queued every synchronous load ahead of the forward."""

    # -- saves --------------------------------------------------------------------------------------

    def _begin_save(self, plan: StepPlan) -> _StepSave:
        if self._step_save is not None:
            return self._step_save
        chunks: list[tuple[bytes, tuple[int, ...]]] = []
        m = self.pages_per_chunk
        for spec in self._kept_saves(plan.saves):
            for c, chunk_hash in enumerate(spec.chunk_hashes):
                chunks.append((self.keys.key(chunk_hash), spec.block_ids[c * m : (c + 1) * m]))
        reservation = None
        if chunks:
            try:
                reservation = self.store.reserve([key for key, _ in chunks])
            except KvtierError as exc:
                log.debug("kvtier save of %d chunk(s) skipped: %s", len(chunks), exc)
        save = _StepSave(reservation)
        if reservation is not None:
            blocks_of = dict(chunks)
            save.block_ids = [b for key in reservation.keys for b in blocks_of[key]]
        self._step_save = save
        return save

    def _kept_saves(self, saves: list[SaveSpec]) -> list[SaveSpec]:
        if not self.keys.writer:
            return []
        return [spec for spec in saves if spec.req_id not in self._step_failed_reqs
                and self._step_failed_blocks.isdisjoint(spec.block_ids)]

    def _gather(self, save: _StepSave, segments: range) -> None:
        if save.reservation is None or not save.reservation.keys or not len(segments):
            return
        try:
            rows = self.store.slot_rows(save.reservation)
        except KvtierError as exc:  # a daemon restart since the reserve: the save is dropped, never misplaced
            log.debug("kvtier save of %d chunk(s) lost: %s", len(save.reservation.keys), exc)
            self._abandon(save)
            return
        self._require_paged().gather_to_slots(save.block_ids, rows, save.reservation.slots, self.pages_per_chunk,
                                              segments)

    def save_kv_layer(self, layer_name: str, plan: StepPlan) -> None:
        segments = self._layer_segments.get(layer_name)
        if not plan.saves or segments is None:
            return
        self._follow(plan)
        save = self._begin_save(plan)
        if layer_name in save.layers_done:
            return
        save.layers_done.add(layer_name)
        try:
            self._gather(save, segments)
        except BaseException:
            self._abandon(save)
            raise

    def wait_for_save(self, plan: StepPlan) -> None:
        try:
            if plan.saves:
                self._follow(plan)
                save = self._begin_save(plan)
                self._finish_save(save)
        finally:
            self._step_save = None
            self._step_failed_reqs, self._step_failed_blocks = set(), set()

    def _finish_save(self, save: _StepSave) -> None:
        if save.reservation is None or not save.reservation.keys:
            return
        # The layers the forward did not hand over (all of them after a full-graph replay), in runs of
        # adjacent segments: one copy per run.
        todo = [self._layer_segments[name] for name in self.geometry.layer_names if name not in save.layers_done]
        try:
            start = None
            for index, segments in enumerate(todo):
                start = segments.start if start is None else start
                if index + 1 == len(todo) or todo[index + 1].start != segments.stop:
                    self._gather(save, range(start, segments.stop))
                    start = None
        except BaseException:
            self._abandon(save)
            raise
        reservation = save.reservation
        if reservation is None:
            return
        self.saved_chunks += len(reservation.keys)
        self._after_device(lambda: self._settle(reservation, commit=True))

    def _abandon(self, save: _StepSave) -> None:
        reservation, save.reservation = save.reservation, None
        if reservation is not None and reservation.keys:
            self._after_device(lambda: self._settle(reservation, commit=False))

    def _settle(self, reservation: Reservation, commit: bool) -> None:
        try:
            (self.store.commit if commit else self.store.abort)(reservation)
        except KvtierError as exc:
            log.debug("kvtier save of %d chunk(s) lost: %s", len(reservation.keys), exc)

    # -- completions --------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.poll()
        received = set()
        for req_id, (spec, future) in list(self._async_loads.items()):
            if future.done():
                del self._async_loads[req_id]
                self._load(spec, future.result())
                received.add(req_id)
        return None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def pending_copies(self) -> int:
        """Copies queued on the device whose commit, abort or release has not run yet."""
        return len(self._pending)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        for spec, future in self._async_loads.values():
            self._release(future.result())
            self.failed_chunks += len(spec.chunk_hashes)
        self._async_loads = {}
        if self._pending and torch.cuda.is_available():
            torch.cuda.synchronize()
        for _, action in self._pending:
            action()
        self._pending = []
