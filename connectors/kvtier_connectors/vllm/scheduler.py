"""The scheduler side of the vLLM connector: how many tokens kvtier can supply, and what each step moves.

Promises:
- ``get_num_new_matched_tokens`` counts the longest run of whole chunks present in the store right after
  what vLLM already holds, less the prompt's last token when the run reaches it (vLLM must compute at least
  one; the whole last chunk is still loaded and that token's KV written again, the same): one ``lookup``
  (one key list, one round trip to a daemon) per rank. A hit with chunks below the host tier has its reads
  started by that lookup. The load is synchronous when the step's synchronous loads stay within
  ``sync_load_bytes`` and, for a hit reaching below the host tier, those reaching below it within
  ``sync_disk_load_bytes`` (the worker waits for the reads, bounded, before the forward: fewer engine steps
  than an asynchronous load, whose hand-offs dominate a small read); asynchronous otherwise. With tensor
  parallelism the hit is the shortest over all key ranks (ranks holding the same KV share keys). With an
  EAGLE-style drafter (``eagle_drafts``) the hit ends one token short of its last chunk: the drafter's KV
  there was computed over the saver's next token, and vLLM computes it again over the request's own.
- A store that fails (a daemon gone or restarting) is a miss, never an exception inside ``schedule()``.
- ``update_state_after_alloc`` turns the hit into a ``LoadSpec`` over the blocks vLLM allocated; it is sent
  in the next ``build_connector_meta``.
- ``build_connector_meta`` numbers the step and asks for a save of every chunk that becomes whole (all its
  tokens computed and hashed) in the step, after the leading run the store already holds for every rank
  (one ``lookup``). With an EAGLE-style drafter, while a request decodes, the chunk holding its newest
  tokens waits until a chunk past it is computed (vLLM rewrites the drafter's KV there when speculated
  tokens are rejected), as vLLM's offloading connector does.
- The commit rule: workers stage a step's saves; they are committed only once the scheduler has read that
  step's output (``update_connector_output``: vLLM's merge of every rank's load errors, with the step number
  of ``KvtierWorkerMeta``) and sends its ``Verdict`` in a later step's plan. A chunk is dropped when the
  request's blocks up to the chunk's end hold a block whose load failed, as reported in the output of its
  own step or of any step read while it was in flight (asynchronous scheduling plans step t+1 before it
  reads step t's errors). Any request whose blocks include a failed block counts, so a request that took a
  local prefix hit on another's failed load is covered. A step whose output never came drops everything,
  as does one still without a verdict ``MAX_UNSETTLED_STEPS`` steps later (outputs that name no step).
- Blocks vLLM reports as failed loads rewind the save cursor of every request holding them (and of every
  request with a dropped save) to the first chunk affected, so the chunks vLLM recomputes are saved again.
- Chunks vLLM does not recompute after a failed load are never saved. A request whose forward in a step still
  without a verdict read a block that failed is tainted from the tokens it had then on, unless vLLM rolls it
  back to them (it does so for the loader, and for a sharer only over the failing step's own tokens: under
  asynchronous scheduling a request admitted in the next step keeps what it computed over the gap). A tainted
  request saves nothing from the chunk of its first tainted token on. Its blocks from there on are spoiled,
  as is a failed block until a step loads into it or an untainted request computes it whole: vLLM's prefix
  cache hands them to later requests (its recompute policy leaves a failed block to an owner that may be
  aborted or preempted first), and a request whose forward reads a spoiled block is tainted from it on.
- ``has_pending_push_work`` keeps vLLM stepping while a step's saves wait for their verdict (or, with KV
  events, a kept chunk for its commit reports), so the last saves of an idle engine are committed and
  announced without waiting for the next request.
- ``request_finished`` never holds a request's blocks (saves are queued on the forward's stream); a
  planned synchronous load of a request that ends before its step is dropped, an asynchronous one is left
  to report (vLLM holds its blocks until then).
- Key epochs are the store's (``Store.epoch``/``advance_epoch``), scoped by the model and tenant salt
  (``epoch_scope``), so every engine of the model on one store (data-parallel ranks, other engines on one
  daemon, a restarted engine) uses the same keys. ``reset_cache`` advances the scope's epoch: nothing saved
  before it is found after it, by this engine or by any other on the store. Every request's first lookup
  carries the scope and its reply the store's epoch: an engine that sees another's reset takes the new
  epoch before it answers, as if it had reset itself. A reset the store cannot record (a daemon gone) moves
  this engine to a private epoch and returns False, so vLLM reports the failure; the engine returns to the
  shared epoch only once the store's advanced past the one it left.
- ``take_events`` yields a ``BlockStored`` event (medium ``CPU``) per chunk a verdict kept, once every
  writing rank reported its commit (``settle``'s ``committed``; a rank's ``lost`` report on that save, or no
  report within ``COMMIT_REPORT_WAIT_S``, and it is never announced), and a
  ``BlockRemoved`` (medium ``CPU``) once per announced chunk when the store no longer holds it (with a
  ``make_removed_event``: the connector passes one only when vLLM publishes KV events): each step
  reads the store's removal log (``Store.removed_since``; one round trip to a daemon, within the scheduler's
  deadline, skipped when it fails) and matches every rank's key of each announced chunk. When the log cannot
  say exactly what left (this engine fell behind it, or the daemon restarted), when a reset or another
  engine's reset moves the key epoch, or when more than ``MAX_ANNOUNCED_CHUNKS`` chunks are announced (the
  oldest), the chunks concerned are announced removed: a router may then miss a hit, never count on one.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.errors import KvtierError
from kvtier.layout import KVLayout
from kvtier.store import LookupResult, Tier
from kvtier_connectors.vllm.metadata import KvtierMetadata
from kvtier_connectors.vllm.settings import BlockStore, ChunkKeys, ConnectorSettings, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec, Verdict

log = logging.getLogger(__name__)
# Steps planned after one whose output has not come, before that one's saves are dropped as lost (vLLM keeps
# at most one step in flight under async scheduling, a few with pipelining).
MAX_UNSETTLED_STEPS = 8
# Chunks announced as stored and watched for their removal (about 10 MiB of keys and hashes at most).
MAX_ANNOUNCED_CHUNKS = 1 << 15
# The longest a committed chunk waits for every writing rank's commit report before it is never announced
# (a report lost with a worker's output; commits follow their verdict within a step or two).
COMMIT_REPORT_WAIT_S = 10.0


@dataclass
class _Hit:
    start_tokens: int
    end_tokens: int
    is_async: bool
    from_disk: bool


@dataclass
class _Tracked:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    next_chunk: int = 0
    # The first token this request computed over a failed (or spoiled) block that vLLM does not compute again:
    # nothing is saved from its chunk on, and its blocks from there on are spoiled.
    tainted_at: int | None = None


@dataclass(frozen=True)
class _PlannedSave:
    """A save of chunks ``first_chunk, first_chunk + 1, ...`` of ``request``, waiting for its verdict."""

    request: Any
    first_chunk: int
    chunk_hashes: tuple[bytes, ...]
    # The request's blocks from its first up to the end of the last saved chunk: the KV the save depends on.
    prefix_block_ids: tuple[int, ...]

    def first_dropped(self, invalid_block_ids: set[int], pages_per_chunk: int) -> int | None:
        """Index in ``chunk_hashes`` of the first chunk computed over a failed block, or None."""
        for index, block_id in enumerate(self.prefix_block_ids):
            if block_id in invalid_block_ids:
                return max(0, index // pages_per_chunk - self.first_chunk)
        return None


@dataclass
class _Committing:
    """A chunk a verdict kept, announced once every writing rank reported its commit (``missing`` empty)."""

    request: Any
    chunk: int
    chunk_hash: bytes
    step: int  # of the save the verdict kept
    keys: tuple[bytes, ...]  # every key rank's
    missing: set[bytes]
    since_s: float


def epoch_scope(settings: ConnectorSettings) -> str:
    """The store's key-epoch scope every engine of this model and tenant salt shares (bounded in length)."""
    digest = hashlib.sha256(f"{settings.model_id}\0{settings.tenant_salt}".encode()).hexdigest()[:32]
    return f"vllm:{digest}"


class SchedulerSide:
    """Per-request bookkeeping of the scheduler-side connector; see the module promises."""

    def __init__(self, settings: ConnectorSettings, layout: KVLayout, geometry: VllmGeometry, store: BlockStore,
                 tp_size: int, make_event: Callable[[Any, int, int, int], Any] | None = None,
                 make_removed_event: Callable[[list[Any]], Any] | None = None, *, kv_replicas: int = 1,
                 eagle_drafts: bool = False) -> None:
        self.store = store
        self.block_tokens = layout.block_tokens
        self.block_bytes = layout.block_bytes
        self.vllm_block_tokens = geometry.vllm_block_tokens
        self.hash_block_tokens = geometry.hash_block_tokens
        self.pages_per_chunk = layout.block_tokens // geometry.vllm_block_tokens
        self.sync_load_bytes = settings.sync_load_bytes
        self.sync_disk_load_bytes = settings.sync_disk_load_bytes
        # Ranks that hold the same KV (MLA's latent, replicated KV heads) share keys: one writer's stand for all.
        num_key_ranks = ChunkKeys(settings, layout, geometry, 0, tp_size, kv_replicas).num_key_ranks
        replicas = tp_size // num_key_ranks
        self.rank_keys = [ChunkKeys(settings, layout, geometry, key_rank * replicas, tp_size, kv_replicas)
                          for key_rank in range(num_key_ranks)]
        # An EAGLE-style drafter's KV at a position depends on the next token, which no chunk hash covers.
        self.eagle_drafts = eagle_drafts
        self._make_event = make_event
        self._make_removed_event = make_removed_event
        self._events: list[Any] = []
        # Chunks kept by a verdict, by every rank's key, until the ranks' commit reports come.
        self._committing: dict[bytes, _Committing] = {}
        # Announced chunks by their rank-0 key: every rank's key and vLLM's block hashes (oldest first).
        self._announced: OrderedDict[bytes, tuple[tuple[bytes, ...], list[Any]]] = OrderedDict()
        self._announced_by_key: dict[bytes, bytes] = {}
        self._removed_seq, self._removed_log = 0, ""
        if make_removed_event is not None:
            self._read_removals()  # from now on: what left before was never announced
        self.epoch_scope = epoch_scope(settings)
        self.key_epoch = ""
        self._epoch = 0  # the store's epoch this engine's keys are under
        self._private_epoch = False  # a reset the store did not record: keys under a random epoch of our own
        try:
            self._enter_epoch(store.epoch(self.epoch_scope))
        except KvtierError as exc:
            log.warning("kvtier: could not read the key epoch of %s, keys start under epoch 0: %s",
                        self.epoch_scope, exc)
        self._requests: dict[str, _Tracked] = {}
        self._hits: dict[str, _Hit] = {}
        self._loads: list[LoadSpec] = []
        self._sync_bytes = 0
        self._sync_disk_bytes = 0
        self._from_disk: dict[str, bool] = {}
        self.failed_lookups = 0
        self._step = 0
        # Steps whose saves wait for their output, the chunks dropped from them so far, verdicts to send.
        self._unsettled: dict[int, list[_PlannedSave]] = {}
        self._dropped: dict[int, set[bytes]] = {}
        self._verdicts: list[Verdict] = []
        # Blocks whose KV is wrong (see the module promises); and, by step still without a verdict, the requests
        # its forward ran and the tokens each had computed before it.
        self._spoiled: set[int] = set()
        self._reads: dict[int, list[tuple[_Tracked, int]]] = {}

    def _lookup(self, keys: ChunkKeys, chunk_hashes: Sequence[bytes], prefetch: bool,
                scope: str | None = None) -> LookupResult:
        try:
            return self.store.lookup(keys.keys(chunk_hashes), prefetch=prefetch, scope=scope)
        except KvtierError as exc:
            self.failed_lookups += 1
            log.debug("kvtier lookup failed, counted as a miss: %s", exc)
            return LookupResult(0, ())

    def _follow_store_epoch(self, epoch: int | None) -> bool:
        """Take the store's epoch when another engine moved it; whether this engine's keys changed."""
        if epoch is None or epoch == self._epoch or (self._private_epoch and epoch <= self._epoch):
            return False
        log.info("kvtier: key epoch of %s moved to %d (a reset by another engine)", self.epoch_scope, epoch)
        self._enter_epoch(epoch)
        # Loads planned already stand: the workers look them up under the new keys, and one not found there
        # fails as any missing chunk does (a miss, its saves dropped by the commit rule).
        for tracked in self._requests.values():
            tracked.next_chunk = 0
        return True

    def _enter_epoch(self, epoch: int, private: bool = False) -> None:
        # The keys of the old epoch are out of reach: what was announced under them is gone for vLLM, and what
        # was being committed under them is never announced.
        self._announce_removed(list(self._announced))
        self._committing.clear()
        self._epoch, self._private_epoch = epoch, private
        # Epoch 0 keeps the keys of a store that was never reset (no epoch in the namespace).
        self.key_epoch = f"private-{secrets.token_hex(8)}" if private else (f"{epoch}" if epoch else "")
        self.rank_keys = [keys.with_epoch(self.key_epoch) for keys in self.rank_keys]


    # -- admission ----------------------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = _Tracked(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self._requests.setdefault(request.request_id, _Tracked(request))
        hashes = request.block_hashes
        keys0 = self.rank_keys[0]
        usable_chunks = min(keys0.num_chunks(hashes), request.num_tokens // self.block_tokens)
        first_chunk = num_computed_tokens // self.block_tokens
        if usable_chunks <= first_chunk:
            return 0, False
        chunk_hashes = [keys0.chunk_hash(hashes, c) for c in range(first_chunk, usable_chunks)]
        # The first lookup's reply carries the store's key epoch: another engine's reset applies here first.
        first = self._lookup(keys0, chunk_hashes, prefetch=True, scope=self.epoch_scope)
        if self._follow_store_epoch(first.epoch):
            first = self._lookup(self.rank_keys[0], chunk_hashes, prefetch=True)
        num_hit, from_disk = first.num_blocks, any(tier is not Tier.HOST for tier in first.tiers[: first.num_blocks])
        for keys in self.rank_keys[1:]:
            if not num_hit:
                break
            found = self._lookup(keys, chunk_hashes[:num_hit], prefetch=True)
            num_hit = found.num_blocks
            from_disk = from_disk or any(tier is not Tier.HOST for tier in found.tiers[:num_hit])
        # A prompt of whole chunks: the last chunk loads too, and vLLM computes its last token over it. A
        # drafter's KV at the hit's last position was computed over the next token of whoever saved it: vLLM
        # computes that position again, over this request's next token.
        end_tokens = min((first_chunk + num_hit) * self.block_tokens - int(self.eagle_drafts), request.num_tokens - 1)
        if end_tokens <= num_computed_tokens:
            self._hits.pop(request.request_id, None)
            return 0, False
        # Synchronous loads stall the whole batch: past the step's budgets a load runs in the background.
        load_bytes = num_hit * self.block_bytes
        is_async = (self._sync_bytes + load_bytes > self.sync_load_bytes
                    or (from_disk and self._sync_disk_bytes + load_bytes > self.sync_disk_load_bytes))
        self._hits[request.request_id] = _Hit(num_computed_tokens, end_tokens, is_async, from_disk)
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
        self._from_disk[request.request_id] = hit.from_disk
        if not hit.is_async:
            self._sync_bytes += len(chunk_hashes) * self.block_bytes
            self._sync_disk_bytes += len(chunk_hashes) * self.block_bytes if hit.from_disk else 0

    def load_came_from_disk(self, request: Any) -> bool:
        """Whether the request's last planned load reached below the host tier."""
        return self._from_disk.get(request.request_id, False)

    # -- each step ----------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> KvtierMetadata:
        self._step += 1
        if self._announced:
            self._read_removals()
        lost = max((s for s in self._unsettled if s <= self._step - MAX_UNSETTLED_STEPS), default=None)
        if lost is not None:
            self._give_verdicts(lost, confirmed=None)
        meta = KvtierMetadata(loads=self._loads, key_epoch=self.key_epoch, step=self._step,
                              verdicts=self._verdicts)
        self._loads, self._sync_bytes, self._sync_disk_bytes, self._verdicts = [], 0, 0, []
        # Each scheduled request with the tokens it had computed before this step and will have after it, and
        # whether it reads its blocks anew (a new or resumed request's hits come from vLLM's prefix cache).
        scheduled: list[tuple[_Tracked, int, int, bool]] = []
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            computed = new.num_computed_tokens
            scheduled.append((tracked, computed, computed + scheduler_output.num_scheduled_tokens[new.req_id], True))
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[index]
            resumed = req_id in cached.resumed_req_ids
            if resumed:
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
                tracked.tainted_at = None  # computed again from its new hit, read again below
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[index]
            after = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            scheduled.append((tracked, computed, after, resumed))
        for index, (tracked, before, after, _) in enumerate(scheduled):
            if tracked.tainted_at is not None and before <= tracked.tainted_at:
                tracked.tainted_at = None  # vLLM computes it all again, over blocks read again below
                scheduled[index] = (tracked, before, after, True)
        if self._spoiled:
            self._refill(meta.loads, scheduled)
            self._spread(scheduled)
        for tracked, _, after, _ in scheduled:
            self._plan_saves(meta, tracked, after)
        self._reads[meta.step] = [(tracked, before) for tracked, before, _, _ in scheduled]
        for old in [s for s in self._reads if s <= self._step - MAX_UNSETTLED_STEPS]:
            del self._reads[old]
        return meta

    def _refill(self, loads: list[LoadSpec], scheduled: list[tuple[_Tracked, int, int, bool]]) -> None:
        """Forget the spoiled blocks this step fills: loaded into, or computed up to their last token by an
        untainted request (a request computes a block from its first token on: a hit or a load never ends
        inside a block it does not fill)."""
        for spec in loads:
            self._spoiled.difference_update(spec.block_ids)
        for tracked, before, after, _ in scheduled:
            if tracked.tainted_at is None:
                self._spoiled.difference_update(
                    tracked.block_ids[before // self.vllm_block_tokens : after // self.vllm_block_tokens])

    def _spread(self, scheduled: list[tuple[_Tracked, int, int, bool]]) -> None:
        """Taint each new, resumed or rolled back request whose forward reads a spoiled block among those it does
        not write (a running request read its other blocks before, or ``settle`` tainted it for reading one that
        failed), and spoil the blocks of each tainted one from its taint on, until nothing changes (vLLM's
        prefix cache may hand a block to another request of the same step)."""
        tokens = self.vllm_block_tokens
        spreading = True
        while spreading:
            spreading = False
            for tracked, before, after, fresh in scheduled:
                read = next((i for i, block_id in enumerate(tracked.block_ids[: before // tokens])
                             if block_id in self._spoiled), None) if fresh else None
                if read is not None and (tracked.tainted_at is None or read * tokens < tracked.tainted_at):
                    tracked.tainted_at = read * tokens
                if tracked.tainted_at is not None:
                    written = set(tracked.block_ids[tracked.tainted_at // tokens : -(-after // tokens)])
                    spreading = spreading or not written <= self._spoiled
                    self._spoiled |= written

    def has_unsettled_saves(self) -> bool:
        """Whether a step's saves still wait for their verdict (or a verdict waits to be sent), or a kept
        chunk for the commit reports that announce it."""
        return bool(self._unsettled or self._verdicts or self._committing)

    def _plan_saves(self, meta: KvtierMetadata, tracked: _Tracked, computed_tokens: int) -> None:
        keys0 = self.rank_keys[0]
        request = tracked.request
        hashes = request.block_hashes
        computed_chunks = computed_tokens // self.block_tokens
        if self.eagle_drafts and computed_tokens > request.num_prompt_tokens:
            # While a request decodes, rejected speculated tokens make vLLM rewrite the drafter's KV near the
            # end of what it computed: the chunk holding the newest tokens waits until the request computed a
            # chunk past it (vLLM's offloading connector does the same).
            computed_chunks -= 1
        whole_chunks = min(computed_chunks, keys0.num_chunks(hashes), len(tracked.block_ids) // self.pages_per_chunk)
        if tracked.tainted_at is not None:
            whole_chunks = min(whole_chunks, tracked.tainted_at // self.block_tokens)
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
        saved_hashes = tuple(chunk_hashes[held:])
        meta.saves.append(SaveSpec(tracked.request.request_id, saved_hashes, block_ids))
        self._unsettled.setdefault(meta.step, []).append(
            _PlannedSave(tracked.request, todo.start, saved_hashes, tuple(tracked.block_ids[: todo.stop * m])))

    def settle(self, step: int | None, invalid_block_ids: set[int], committed: Sequence[tuple[int, bytes]] = (),
               lost: Sequence[tuple[int, bytes]] = ()) -> None:
        """Read one step's output: drop what its load errors spoiled, and give the verdicts of finished steps.

        ``step`` is the step whose output this is (None: unknown, nothing is settled); ``invalid_block_ids``
        are the blocks whose load failed on any rank; ``committed`` and ``lost`` the (step, key) pairs of saves
        the workers committed, and of those they staged or planned but did not commit, since their last report
        (``KvtierWorkerMeta``).
        """
        if invalid_block_ids:
            self._spoiled |= invalid_block_ids
            # A forward of a step in flight that read a failed block computed over it: from its first token on,
            # unless vLLM rolls the request back (checked when it is next scheduled).
            tokens = self.vllm_block_tokens
            for reads in self._reads.values():
                for tracked, before in reads:
                    if not invalid_block_ids.isdisjoint(tracked.block_ids[: -(-before // tokens)]):
                        if tracked.tainted_at is None or before < tracked.tainted_at:
                            tracked.tainted_at = before
                        self._spoiled.update(tracked.block_ids[before // tokens :])
            self.rewind_failed_loads(invalid_block_ids)
            # Every step still in flight was computed over the same blocks: its saves over them are wrong too.
            for unsettled_step, planned in self._unsettled.items():
                for save in planned:
                    first = save.first_dropped(invalid_block_ids, self.pages_per_chunk)
                    if first is not None:
                        self._drop(unsettled_step, save, first)
        if step is not None:
            self._give_verdicts(step, confirmed=step)
            for done in [s for s in self._reads if s <= step]:
                del self._reads[done]
        self._take_commit_reports(committed, lost)

    def _give_verdicts(self, through: int, confirmed: int | None) -> None:
        """Verdicts on every step up to ``through``; only ``confirmed`` had its output read."""
        for done in sorted(s for s in self._unsettled if s <= through):
            planned = self._unsettled.pop(done)
            if done != confirmed:
                # Its output never came: nothing it saved is confirmed.
                for save in planned:
                    self._drop(done, save, 0)
            dropped = self._dropped.pop(done, set())
            self._verdicts.append(Verdict(done, frozenset(dropped)))
            if self._make_event is not None:
                self._publish(done, planned, dropped)

    def _publish(self, step: int, planned: list[_PlannedSave], dropped: set[bytes]) -> None:
        """Wait for the commit reports of each chunk a verdict keeps, once per chunk (requests may share one)."""
        now = time.monotonic()
        kept = set(dropped)
        for save in planned:
            for index, chunk_hash in enumerate(save.chunk_hashes):
                if chunk_hash not in kept:
                    kept.add(chunk_hash)
                    keys = tuple(keys.key(chunk_hash) for keys in self.rank_keys)
                    committing = _Committing(save.request, save.first_chunk + index, chunk_hash, step, keys, set(keys),
                                             now)
                    for key in keys:
                        self._committing[key] = committing

    def _take_commit_reports(self, committed: Sequence[tuple[int, bytes]],
                             lost: Sequence[tuple[int, bytes]]) -> None:
        """A ``BlockStored`` event per kept chunk once every writing rank committed the save the verdict kept
        (or a later one of the chunk); none once one rank did not. Reports on an earlier save of the chunk (a
        copy aborted or moved to a later step) decide nothing."""
        for step, key in lost:
            gone = self._committing.get(key)
            if gone is not None and step >= gone.step:
                self._forget_committing(gone)
        keys0 = self.rank_keys[0]
        for step, key in committed:
            committing = self._committing.get(key)
            if committing is None or step < committing.step:
                continue
            committing.missing.discard(key)
            if committing.missing:
                continue
            self._forget_committing(committing)
            assert self._make_event is not None
            self._events.append(self._make_event(committing.request, committing.chunk, keys0.hashes_per_chunk,
                                                 self.hash_block_tokens))
            first, count = committing.chunk * keys0.hashes_per_chunk, keys0.hashes_per_chunk
            self._watch(committing.chunk_hash, list(committing.request.block_hashes[first : first + count]))
        expired = time.monotonic() - COMMIT_REPORT_WAIT_S
        for committing in {id(c): c for c in self._committing.values() if c.since_s < expired}.values():
            self._forget_committing(committing)

    def _forget_committing(self, committing: _Committing) -> None:
        for key in committing.keys:
            if self._committing.get(key) is committing:
                del self._committing[key]

    def _watch(self, chunk_hash: bytes, block_hashes: list[Any]) -> None:
        """Remember an announced chunk's keys, to announce its removal when the store no longer holds it."""
        if self._make_removed_event is None:
            return
        keys = tuple(keys.key(chunk_hash) for keys in self.rank_keys)
        if keys[0] in self._announced:
            return
        self._announced[keys[0]] = (keys, block_hashes)
        for key in keys:
            self._announced_by_key[key] = keys[0]
        if len(self._announced) > MAX_ANNOUNCED_CHUNKS:
            self._announce_removed([next(iter(self._announced))])

    def _read_removals(self) -> None:
        """Announce the removal of the announced chunks the store's log says left (all, if it cannot say)."""
        try:
            removals = self.store.removed_since(self._removed_seq)
        except KvtierError as exc:
            log.debug("kvtier: reading the store's removals failed, tried again next step: %s", exc)
            return
        if removals.overflowed or removals.log_id != self._removed_log:
            if self._removed_log:
                log.info("kvtier: the store's removal log cannot say which chunks left: all announced as removed")
            gone = list(self._announced)
        else:
            gone = list(dict.fromkeys(chunk for key in removals.keys
                                      if (chunk := self._announced_by_key.get(key)) is not None))
        self._removed_seq, self._removed_log = removals.next_seq, removals.log_id
        self._announce_removed(gone)

    def _announce_removed(self, chunks: list[bytes]) -> None:
        if not chunks or self._make_removed_event is None:
            return
        hashes: list[Any] = []
        for chunk in chunks:
            keys, block_hashes = self._announced.pop(chunk)
            hashes.extend(block_hashes)
            for key in keys:
                self._announced_by_key.pop(key, None)
        self._events.append(self._make_removed_event(hashes))

    def _drop(self, step: int, save: _PlannedSave, first: int) -> None:
        self._dropped.setdefault(step, set()).update(save.chunk_hashes[first:])
        tracked = self._requests.get(save.request.request_id)
        if tracked is not None:
            tracked.next_chunk = min(tracked.next_chunk, save.first_chunk + first)

    def rewind_failed_loads(self, invalid_block_ids: set[int]) -> None:
        """Save again, once vLLM recomputed them, the chunks over blocks whose load failed."""
        for tracked in self._requests.values():
            for index, block_id in enumerate(tracked.block_ids[: tracked.next_chunk * self.pages_per_chunk]):
                if block_id in invalid_block_ids:
                    tracked.next_chunk = index // self.pages_per_chunk
                    break

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> bool:
        """Advance the store's key epoch of this model: every chunk saved before is out of reach, for every
        engine on the store, and running requests save again. False when the store could not record it (this
        engine then keys under a private epoch, so it still finds nothing saved before)."""
        try:
            epoch, recorded = self.store.advance_epoch(self.epoch_scope), True
        except KvtierError as exc:
            log.warning("kvtier: the store could not record a reset of %s; this engine alone forgets: %s",
                        self.epoch_scope, exc)
            epoch, recorded = self._epoch, False
        self._enter_epoch(epoch, private=not recorded)
        for tracked in self._requests.values():
            tracked.next_chunk = 0
        self._hits.clear()
        self._loads = [spec for spec in self._loads if spec.is_async]
        return recorded

    def request_finished(self, request: Any) -> bool:
        self._hits.pop(request.request_id, None)
        self._from_disk.pop(request.request_id, None)
        # A synchronous load planned for a request that ends before the next step must not write into freed
        # blocks; an asynchronous one must still run and report, since vLLM holds its blocks until it does.
        self._loads = [spec for spec in self._loads if spec.req_id != request.request_id or spec.is_async]
        self._requests.pop(request.request_id, None)
        return False
