"""The worker side of the vLLM connector: pages moved in place between vLLM's paged KV and arena slots.

This module imports no vLLM: a benchmark or a GPU check drives it with caches in vLLM's layouts.

Promises:
- ``register_kv_caches`` sees each layer's cache as pages on a leading block dimension (any shape, any
  in-page order, as ``kvtier.native.byte_rows`` reads it; a K/V pair of planes on a leading dim of 2, as
  older vLLM releases had, is two segments). It checks that ``pages_per_chunk`` pages of every layer make
  exactly one kvtier block and raises ``LayoutMismatchError`` saying what it found otherwise.
- Synchronous loads are complete, or queued on the current stream ahead of anything vLLM queues after it,
  when ``start_load_kv`` returns: the chunks are leased (``acquire``, which waits for the disk reads the
  scheduler's lookup started at most ``SYNC_LOAD_WAIT_S``; a chunk still unread then fails) and scattered
  from their arena slots straight into the paged cache, every layer at once. The forward never reads a page
  before it is in place, whatever the CUDA graph mode (per-layer hooks, skipped by full-graph replays, have
  nothing to do).
  A lease is released only once its scatter ran (its CUDA event completed; on the CPU the copy is done).
- A chunk the store cannot deliver (evicted since the lookup, failed checksum, daemon gone) is never
  scattered: its blocks are reported by ``get_block_ids_with_load_errors`` in the step that found them.
  Which saves that spoils is decided by the scheduler side, over every rank (the commit rule below).
- Asynchronous loads (from disk, or over the synchronous budget) acquire in a background thread, on
  ``load_store`` (a daemon client of its own, so a disk promotion never holds the worker's saves), and are
  scattered from that client's mapping and released through it. ``get_finished`` queues the scatter of a
  finished one on a load stream of its own (after what the forward's stream queued so far, which may still
  use the blocks), so the next forward never waits behind it, and reports the request as received only once
  that scatter ran (its CUDA event completed; at once on the CPU). Its failed blocks are reported no later.
- Saves reserve slots for the step's chunks and gather the paged cache straight into them: per layer in
  ``save_kv_layer`` as the forward writes it, the rest in one copy in ``wait_for_save``. The slots are then
  staged, not committed: a later plan's ``Verdict`` on the step commits its chunks (``saved_chunks`` counts
  them) and aborts the dropped ones, each once the gathers ran (their CUDA event completed); a failed gather
  aborts at once. A chunk this worker still stages for an earlier step is gathered again into the same slot
  (queued after the first gather) and the later step's verdict decides it: a dropped copy never blocks the
  recomputed one, and ``reserve`` skipping a key never makes a chunk permanent without its verdict.
  ``take_commit_reports`` hands over the keys committed since the last call, and those planned or staged but
  not committed (refused by ``reserve``, already held or being written, dropped, a failed gather or commit):
  the scheduler side announces a chunk only once every writing rank committed it. Gathers
  are queued on the forward's stream, so vLLM may free and reuse the blocks at once: saves never hold a
  request (``get_finished`` reports no sends). A full arena or a gone daemon makes a save a later miss.
- Thread-safe: vLLM may hand a step's layers over from two micro-batch threads; the step then gathers
  every layer once in ``wait_for_save``, after the per-layer gathers already queued, so no page is
  saved before its micro-batch wrote it. CUDA events are recorded on the cache's device's stream.
- ``step`` is the step of the last plan seen (``KvtierWorkerMeta`` reports it to the scheduler side).
- No staging buffer, no pinned allocation and no host copy on the way; nothing waits for the device,
  except ``shutdown``, which waits for every queued copy (each by its own event, on whatever GPU it runs;
  at most ``timeout_s``), aborts what has no verdict, and releases every lease. A copy still running at
  the deadline keeps its slots: they are never released (or reused) under it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.errors import KvtierError, LayoutMismatchError
from kvtier.layout import KVLayout
from kvtier.native import PagedKV, byte_rows
from kvtier.store import Lease, Reservation
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, StepPlan, Verdict

log = logging.getLogger(__name__)

# How long ``shutdown`` waits for the copies still queued on the device, and how often it looks.
SHUTDOWN_WAIT_S = 30.0
_SHUTDOWN_POLL_S = 0.001
# The longest a synchronous load (which holds the step's forward) waits for its chunks' reads from disk.
SYNC_LOAD_WAIT_S = 1.0
_EMPTY_LEASE = Lease((), ())


@dataclass
class _StepSave:
    """The slots one step's saves gather into (``keys[i]`` into ``slots[i]``) and their blocks, chunk by chunk."""

    step: int
    keys: list[bytes] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    chunk_hashes: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    layers_done: set[str] = field(default_factory=set)
    generation: str = ""  # of the reservation the slots came from (``Reservation.generation``)
    # Threads that handed layers over in this step; a second one means micro-batches (see save_kv_layer).
    threads: set[int] = field(default_factory=set)
    deferred: bool = False
    # CUDA events after each per-layer gather: a deferred step's final gathers are queued after them.
    gathered: list[torch.cuda.Event] = field(default_factory=list)


@dataclass
class _Staged:
    """A step's gathered chunks waiting for its verdict: key -> (slot, chunk hash, reservation generation)."""

    chunks: dict[bytes, tuple[int, bytes, str]]


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

    def __init__(self, layout: KVLayout, geometry: VllmGeometry, store: BlockStore, keys: ChunkKeys,
                 load_store: BlockStore | None = None) -> None:
        self.layout = layout
        self.geometry = geometry
        self.store = store
        self.load_store = store if load_store is None else load_store
        self.keys = keys
        self.pages_per_chunk = layout.block_tokens // geometry.vllm_block_tokens
        self.paged: PagedKV | None = None
        self._layer_segments: dict[str, range] = {}
        self._step_save: _StepSave | None = None
        self.step = 0
        # Staged saves by step, and the step whose verdict decides each staged key.
        self._staged: dict[int, _Staged] = {}
        self._owner: dict[bytes, int] = {}
        self._async_loads: dict[str, tuple[LoadSpec, Future[Lease]]] = {}
        # Asynchronous loads whose scatter is queued on the load stream, and its completion (None: done).
        self._scattering: dict[str, torch.cuda.Event | None] = {}
        self._load_stream: torch.cuda.Stream | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-load")
        self._load_errors: set[int] = set()
        # Copies queued on the device and what to do once each ran (commit, abort, release), in order.
        self._pending: list[tuple[torch.cuda.Event | None, Callable[[], None]]] = []
        self.saved_chunks = 0
        # (step, key) committed, and planned or staged but not committed, since the last commit report.
        self._committed_keys: list[tuple[int, bytes]] = []
        self._lost_keys: list[tuple[int, bytes]] = []
        self.loaded_chunks = 0
        self.failed_chunks = 0
        # vLLM may run a step's micro-batches on two threads: the step's save state is shared between them.
        self._lock = threading.RLock()

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
        # The arena is registered with CUDA on vLLM's device, so the gathers and scatters read it in place.
        self.store.pin_for(paged.device)

    def _require_paged(self) -> PagedKV:
        if self.paged is None:
            raise LayoutMismatchError("register_kv_caches was not called before the first transfer")
        return self.paged

    def _follow(self, plan: StepPlan) -> None:
        """Take a step's plan, once: its key epoch and its verdicts on earlier steps."""
        if plan.step and plan.step == self.step:
            return
        self.step = plan.step
        if plan.key_epoch != self.keys.epoch:
            self.keys = self.keys.with_epoch(plan.key_epoch)
        self.settle(plan.verdicts)

    def settle(self, verdicts: list[Verdict]) -> None:
        """Commit the staged chunks each verdict keeps and abort the others (once their gathers ran).

        A staged step older than the newest verdict that got none is aborted: its verdict was lost.
        """
        if not verdicts:
            return
        newest = max(verdict.step for verdict in verdicts)
        dropped = {verdict.step: verdict.dropped for verdict in verdicts}
        for step in sorted(s for s in self._staged if s <= newest):
            staged = self._staged.pop(step)
            for key in staged.chunks:
                del self._owner[key]
            spoiled = dropped.get(step)
            keep = [] if spoiled is None else [k for k, (_, h, _) in staged.chunks.items() if h not in spoiled]
            kept = set(keep)
            gone = [k for k in staged.chunks if k not in kept]
            self._after_device(functools.partial(self._settle, step, staged.chunks, keep, gone))

    def _settle(self, step: int, chunks: dict[bytes, tuple[int, bytes, str]], commit: list[bytes],
                abort: list[bytes]) -> None:
        """Commit and abort the chunks of step ``step``'s saves, and report which."""
        for keys, action in ((commit, self.store.commit), (abort, self.store.abort)):
            # One handle per generation: each names the arena (and connection) its slots came from.
            for generation in dict.fromkeys(chunks[k][2] for k in keys):
                part = [k for k in keys if chunks[k][2] == generation]
                committed = False
                try:
                    action(Reservation(tuple(part), tuple(chunks[k][0] for k in part), (), generation))
                    committed = keys is commit
                except KvtierError as exc:
                    log.debug("kvtier save of %d chunk(s) lost: %s", len(part), exc)
                with self._lock:
                    (self._committed_keys if committed else self._lost_keys).extend((step, key) for key in part)
                    self.saved_chunks += len(part) if committed else 0

    def take_commit_reports(self) -> tuple[tuple[tuple[int, bytes], ...], tuple[tuple[int, bytes], ...]]:
        """The (save step, key) pairs committed and those not committed since the last call (see the module
        promises)."""
        with self._lock:
            reports = tuple(self._committed_keys), tuple(self._lost_keys)
            self._committed_keys, self._lost_keys = [], []
        return reports

    def _after_device(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the copies queued so far on the current stream ran (at once on the CPU)."""
        device = self._require_paged().device
        if device.type != "cuda":
            action()
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(device))
        with self._lock:
            self._pending.append((event, action))

    def poll(self) -> None:
        """Run the actions of the queued copies that completed, in queue order (thread-safe)."""
        with self._lock:
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
                future = self._pool.submit(self._acquire, self.load_store, self.keys, spec)
                self._async_loads[spec.req_id] = (spec, future)
            else:
                self._load(spec, self._acquire(self.store, self.keys, spec), self.store)

    def _acquire(self, store: BlockStore, keys: ChunkKeys, spec: LoadSpec) -> Lease:
        try:
            return store.acquire(keys.keys(spec.chunk_hashes), None if spec.is_async else SYNC_LOAD_WAIT_S)
        except KvtierError as exc:
            log.warning("kvtier load of %d chunk(s) for %s failed, vLLM recomputes them: %s",
                        len(spec.chunk_hashes), spec.req_id, exc)
            return _EMPTY_LEASE

    def _load(self, spec: LoadSpec, lease: Lease, store: BlockStore) -> bool:
        """Scatter the leased leading chunks of ``spec``; report the rest. True when every chunk loaded."""
        paged, m = self._require_paged(), self.pages_per_chunk
        rows = None
        if lease.slots:
            try:
                # The lease's own arena: after a daemon restart since the acquire its slots are unreadable here.
                rows = store.slot_rows(lease)
            except KvtierError as exc:
                log.warning("kvtier load for %s lost its lease, vLLM recomputes it: %s", spec.req_id, exc)
                self._release(lease, store)
        num_leased = len(lease.slots) if rows is not None else 0
        pages = [(spec.first_page + i, block_id) for i, block_id in enumerate(spec.block_ids)]
        failed = [block_id for page, block_id in pages if page // m >= num_leased]
        self._load_errors.update(failed)
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
                self._after_device(lambda: self._release(lease, store))
        return not failed

    def _release(self, lease: Lease, store: BlockStore) -> None:
        try:
            store.release(lease)
        except KvtierError as exc:
            log.debug("releasing a lease failed (the daemon drops a lost connection's leases itself): %s", exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: ``start_load_kv`` queued every synchronous load ahead of the forward."""

    # -- saves --------------------------------------------------------------------------------------

    def _begin_save(self, plan: StepPlan) -> _StepSave:
        if self._step_save is not None:
            return self._step_save
        save = self._step_save = _StepSave(step=plan.step)
        if not self.keys.writer:
            return save
        m = self.pages_per_chunk
        chunks: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
        for spec in plan.saves:
            for c, chunk_hash in enumerate(spec.chunk_hashes):
                chunks.setdefault(self.keys.key(chunk_hash), (chunk_hash, spec.block_ids[c * m : (c + 1) * m]))
        # A key this worker stages for an earlier step is written again into its slot; this step's verdict
        # decides it (``reserve`` would skip it, and the earlier copy may be dropped).
        restaged = [key for key in chunks if key in self._owner]
        fresh = [key for key in chunks if key not in self._owner]
        again = {key: self._staged[self._owner.pop(key)].chunks.pop(key) for key in restaged}
        if fresh:
            try:
                reservation = self.store.reserve(fresh)
            except KvtierError as exc:
                log.debug("kvtier save of %d chunk(s) skipped: %s", len(fresh), exc)
                self._lost_keys.extend((plan.step, key) for key in fresh)
            else:
                save.keys.extend(reservation.keys)
                save.slots.extend(reservation.slots)
                save.generation = reservation.generation
                # Keys already held (or being written elsewhere) are not this worker's to commit.
                reserved = set(reservation.keys)
                self._lost_keys.extend((plan.step, key) for key in fresh if key not in reserved)
        if again and not save.keys:
            save.generation = next(iter(again.values()))[2]
        # A restaged slot of another generation (a daemon restart since it was reserved) is not written again:
        # it is aborted once the copies queued on it ran, and the chunk is a later miss.
        stale = {key: chunk for key, chunk in again.items() if chunk[2] != save.generation}
        if stale:
            self._after_device(functools.partial(self._settle, plan.step, stale, [], list(stale)))
        for key, (slot, _, _) in again.items():
            if key not in stale:
                save.keys.append(key)
                save.slots.append(slot)
        for key in save.keys:
            chunk_hash, block_ids = chunks[key]
            save.chunk_hashes.append(chunk_hash)
            save.block_ids.extend(block_ids)
        return save

    def _gather(self, save: _StepSave, segments: range) -> None:
        if not save.keys or not len(segments):
            return
        try:
            # The reservation's own arena: after a daemon restart since the reserve the save is dropped,
            # never written into another arena's slots.
            rows = self.store.slot_rows(Reservation(tuple(save.keys), tuple(save.slots), (), save.generation))
        except KvtierError as exc:
            log.debug("kvtier save of %d chunk(s) lost: %s", len(save.keys), exc)
            self._abandon(save)
            return
        self._require_paged().gather_to_slots(save.block_ids, rows, save.slots, self.pages_per_chunk, segments)

    def save_kv_layer(self, layer_name: str, plan: StepPlan) -> None:
        """Gather ``layer_name``'s pages of the step's saves, queued behind the forward that wrote them.

        Thread-safe. When a second thread hands layers over in one step (micro-batches, each writing only
        its own requests' pages), a per-layer gather could copy a layer before the other micro-batch wrote
        it: the step then gathers every layer in ``wait_for_save`` instead, queued after the gathers
        already made, so the slots end with the whole step's pages.
        """
        segments = self._layer_segments.get(layer_name)
        with self._lock:
            self._follow(plan)
            if not plan.saves or segments is None:
                return
            save = self._begin_save(plan)
            save.threads.add(threading.get_ident())
            if len(save.threads) > 1 and not save.deferred:
                save.deferred = True
                save.layers_done.clear()
            if save.deferred or layer_name in save.layers_done:
                return
            save.layers_done.add(layer_name)
            try:
                self._gather(save, segments)
            except BaseException:
                self._abandon(save)
                raise
            device = self._require_paged().device
            if device.type == "cuda":
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(device))
                save.gathered.append(event)

    def wait_for_save(self, plan: StepPlan) -> None:
        with self._lock:
            try:
                self._follow(plan)
                if plan.saves:
                    save = self._begin_save(plan)
                    if save.gathered and save.deferred:
                        stream = torch.cuda.current_stream(self._require_paged().device)
                        for event in save.gathered:
                            stream.wait_event(event)
                    self._finish_save(plan.step, save)
            finally:
                self._step_save = None

    def _finish_save(self, step: int, save: _StepSave) -> None:
        if not save.keys:
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
        staged = self._staged.setdefault(step, _Staged({}))
        for key, slot, chunk_hash in zip(save.keys, save.slots, save.chunk_hashes, strict=True):
            staged.chunks[key] = (slot, chunk_hash, save.generation)
            self._owner[key] = step

    def _abandon(self, save: _StepSave) -> None:
        chunks = {key: (slot, b"", save.generation) for key, slot in zip(save.keys, save.slots, strict=True)}
        save.keys, save.slots = [], []
        if chunks:
            self._after_device(lambda: self._settle(save.step, chunks, [], list(chunks)))

    # -- completions --------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.poll()
        for req_id, (spec, future) in list(self._async_loads.items()):
            if future.done():
                del self._async_loads[req_id]
                self._scattering[req_id] = self._scatter_on_load_stream(spec, future.result())
        received = set()
        for req_id, event in list(self._scattering.items()):
            if event is None or event.query():  # type: ignore[no-untyped-call]
                del self._scattering[req_id]
                received.add(req_id)
        return None, received or None

    def _scatter_on_load_stream(self, spec: LoadSpec, lease: Lease) -> torch.cuda.Event | None:
        """Queue an asynchronous load's scatter on the load stream; its completion event (None on the CPU)."""
        paged = self._require_paged()
        if paged.device.type != "cuda":
            self._load(spec, lease, self.load_store)
            return None
        if self._load_stream is None:
            self._load_stream = torch.cuda.Stream(paged.device)  # type: ignore[no-untyped-call]
        # The blocks may have served another request whose forward work is still queued.
        self._load_stream.wait_stream(torch.cuda.current_stream(paged.device))
        with torch.cuda.stream(self._load_stream):
            self._load(spec, lease, self.load_store)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._load_stream)
        return event

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def pending_copies(self) -> int:
        """Copies queued on the device whose commit, abort or release has not run yet."""
        return len(self._pending)

    def staged_chunks(self) -> int:
        """Chunks gathered and waiting for their step's verdict."""
        return len(self._owner)

    def shutdown(self, timeout_s: float = SHUTDOWN_WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        self._pool.shutdown(wait=True)
        # No verdict will come: what is staged is never committed.
        for step, staged in self._staged.items():
            chunks = staged.chunks
            self._after_device(functools.partial(self._settle, step, chunks, [], list(chunks)))
        self._staged, self._owner = {}, {}
        for spec, future in self._async_loads.values():
            self._release(future.result(), self.load_store)
            self.failed_chunks += len(spec.chunk_hashes)
        self._async_loads, self._scattering = {}, {}
        with self._lock:
            pending, self._pending = self._pending, []
        for index, (event, action) in enumerate(pending):
            while event is not None and not event.query():  # type: ignore[no-untyped-call]
                if time.monotonic() >= deadline:
                    log.warning("kvtier: %d copies still running on the GPU after %.0f s at shutdown; their "
                                "slots stay held", len(pending) - index, timeout_s)
                    return
                time.sleep(_SHUTDOWN_POLL_S)
            action()
