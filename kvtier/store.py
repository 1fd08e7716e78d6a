"""The embedded store: kvtier's public API over the host tier, the lower tiers and the transfer engine.

Primitives (each documented where it is defined):

- ``lookup(keys)``: the longest leading run of keys present, and the tier of each (``host``, ``disk``,
  ``remote``); starts reads of the part below the host at once (prefetch into host slots).
- ``put(keys, blocks)`` / ``get(keys, blocks)``: asynchronous copies from / into caller tensors (CPU or
  CUDA); each returns a ``Job``.
- ``reserve`` / ``commit`` / ``abort`` and ``acquire`` / ``release``: the zero-copy path, for callers that
  write and read arena slots themselves (the daemon's clients, the vLLM gather kernels); ``slot_rows()``
  is the arena as one ``(num_slots, slot_bytes)`` view for ``PagedKV.gather_to_slots`` and friends.
  ``lookup_acquire`` is a lookup and the acquire of its run in one call (a restore's pair).
- ``epoch(scope)`` / ``advance_epoch(scope)``: the key epoch callers mix into the keys of a scope; advancing
  it makes the scope's old keys unreachable (``kvtier.epochs``; persisted in the disk tier's index).
- ``removed_since(seq)``: the keys that left every tier since ``seq`` (``kvtier.removals``: bounded, says
  when a reader fell behind), for clients that announce what the store holds (vLLM's KV events).
- ``stats()``: an immutable ``StoreStats`` snapshot. ``close()``: finish jobs, flush and close the lower tiers.

The tiers below the host pool (disk, remote) are an ordered chain behind one interface
(``kvtier.tiers``): the store never names one.

Promises:
- Every argument is checked before anything changes: bad keys, blocks of another dtype, shape or byte
  size raise ``InvalidInputError``; a closed store raises ``ClosedError``.
- A put of a key already present (or being written) is deduplicated: counted, not copied again.
- A copy that fails, or cannot even be queued (a closed engine, a kernel that does not launch), fails its
  indices of the job: a put's reservations are aborted (a later put of the keys stores them), a get's pins
  released, and the job ends (``kvtier.transfer.submit_or_fail``).
- A get returns exactly the bytes that were put under a key, or reports that index as failed; a lower-tier
  block that fails its checksum is a failed index and a counter, never data.
- Blocks move down on host eviction (to every lower tier lacking them) and on commit (to the tiers in
  write-through mode), and up from the nearest tier holding them (promotion); the lower copy stays valid,
  but for a disk tier whose admission runs it exclusive of host RAM: it drops its copy once the host's copy
  is committed (``DiskTier.moved_to_host``), and the host's eviction offers the block again.
- A lookup waits on the network at most once per lower tier, bounded by that tier's timeout; nothing else
  the store does on the caller's thread waits on the network, but ``acquire``, for promotions, at most its
  ``timeout`` (``PROMOTION_WAIT_S`` without one).
- A write-through never runs on the committing thread (``commit``, a put's completion) nor under the store's
  lock: the commit read-pins its blocks and queues them (``kvtier.write_through``: one background thread
  offers them to the write-through tiers). A full queue (a drive that is behind) holds that commit for at
  most ``host.write_through_wait_ms``, never another thread's lookup, acquire or commit; past it the blocks
  are not written through (``write_through_skipped_blocks``) and are demoted on eviction instead. A queued
  block stays in the host tier (lookups find it) and its slot is not evicted until it was offered. The
  queue pins at most ``host.write_through_queue_bytes`` of slots (half the pool at most): that much less
  the host can evict.
- ``flush`` returns once every block committed before it was offered to its write-through tiers and those
  tiers wrote what they hold in memory. ``close`` waits at most ``CLOSE_WAIT_S`` for promotions and the
  write-through queue (what is left then is logged and skipped), never hanging on a tier.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from kvtier.arena import PAGE_BYTES, HostArena, round_up
from kvtier.config import StoreConfig
from kvtier.epochs import KeyEpochs
from kvtier.errors import (
    CapacityError,
    ClosedError,
    ConfigError,
    FlushTimeoutError,
    InvalidInputError,
    StaleHandleError,
)
from kvtier.host import HostTier
from kvtier.job import Job
from kvtier.keys import BlockHasher, HashAlgo, Namespace, check_keys
from kvtier.layout import KVLayout
from kvtier.policies import make_policy
from kvtier.removals import RemovalLog, Removals
from kvtier.stats import StoreStats, TierStats
from kvtier.tiers import LowerTier, build_chain
from kvtier.transfer import Direction, TransferEngine, make_transfer_engine, submit_or_fail
from kvtier.write_through import WriteThroughQueue

# The longest an ``acquire`` without a timeout waits for its promotions: a tier that never answers must not
# hang the caller (nor a daemon's session and its shutdown).
PROMOTION_WAIT_S = 30.0
# The longest ``close`` waits for promotions and for the write-through queue, in all: a tier that never answers
# must not hang a daemon's shutdown.
CLOSE_WAIT_S = 30.0
# How long ``flush`` waits by default: a whole write-back buffer written at a slow drive's pace.
FLUSH_WAIT_S = 120.0

_LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvtier.disk import DiskTier


class Tier(enum.StrEnum):
    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


_TIERS = {tier.value: tier for tier in Tier}  # a dict read, not an enum call, per block of a long lookup


@dataclass(frozen=True)
class LookupResult:
    """``num_blocks`` leading keys are present; ``tiers[i]`` says where block ``i`` was found.

    ``epoch`` is the current key epoch of the scope the lookup named (``None`` when it named none).
    """

    num_blocks: int
    tiers: tuple[Tier, ...]
    epoch: int | None = None


@dataclass(frozen=True)
class Reservation:
    """Slots reserved for writing. ``keys[i]`` goes to ``slots[i]``; ``skipped`` were already present.

    ``generation`` names the arena (and, for a daemon client, the connection) the slots belong to: slot rows
    and commits are resolved against it only.
    """

    keys: tuple[bytes, ...]
    slots: tuple[int, ...]
    skipped: tuple[bytes, ...]
    generation: str = ""


@dataclass(frozen=True)
class Lease:
    """Read pins on the leading run ``keys`` of an ``acquire``: ``slots[i]`` holds ``keys[i]``.

    ``generation`` names the arena (and, for a daemon client, the connection) the slots belong to.
    """

    keys: tuple[bytes, ...]
    slots: tuple[int, ...]
    generation: str = ""


Handle = Lease | Reservation


@functools.cache
def _block_forms(layout: KVLayout) -> tuple[torch.dtype, tuple[torch.Size, torch.Size]]:
    """The dtype and the two accepted shapes of a block of ``layout`` (read once per layout, not per call)."""
    return layout.torch_dtype, (torch.Size(layout.block_shape), torch.Size((layout.block_numel,)))


def check_keys_and_blocks(layout: KVLayout, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> list[bytes]:
    """The arguments of a put or get, checked: one well-formed key per block of ``layout``."""
    checked = check_keys(keys)
    if len(checked) != len(blocks):
        raise InvalidInputError(f"{len(checked)} keys but {len(blocks)} blocks")
    # ``check_block``'s conditions with the layout's properties read once (it costs 5-15 us a block);
    # a block that fails them goes through ``check_block`` for its precise error.
    dtype, shapes = _block_forms(layout)
    for i, block in enumerate(blocks):
        if not (isinstance(block, torch.Tensor) and block.dtype == dtype and block.shape in shapes
                and block.is_contiguous()):
            layout.check_block(block, f"blocks[{i}]")
    return checked


def as_bytes(block: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    return block.reshape(-1).view(torch.uint8)


class Store:
    """An in-process tiered block store for one KV layout. See the module docstring for the promises."""

    def __init__(self, layout: KVLayout, config: StoreConfig | None = None, *, arena_name: str | None = None,
                 transfer: TransferEngine | None = None) -> None:
        self.layout = layout
        self.config = config or StoreConfig()
        self.slot_bytes = round_up(layout.block_bytes, PAGE_BYTES)
        num_slots = self.config.host.capacity_bytes // self.slot_bytes
        if num_slots < 1:
            raise ConfigError(
                f"host.capacity_bytes={self.config.host.capacity_bytes} holds no block of {layout.block_bytes} bytes"
            )
        self._lock = threading.RLock()
        self._closed = False
        self._counters = dict.fromkeys(
            ("lookups", "hit_blocks", "miss_blocks", "put_blocks", "put_deduplicated_blocks", "put_failed_blocks",
             "get_blocks", "get_failed_blocks", "bytes_put", "bytes_got", "host_hit_blocks", "promoted_blocks",
             "promotion_failed_blocks", "demoted_blocks"), 0)
        self.arena = HostArena(num_slots, self.slot_bytes, name=arena_name)
        # Prefault only: the arena is registered with CUDA by the first copy from a GPU, on that GPU
        # (``pin_for``), so a store that never copies to a GPU (the daemon's) never makes a CUDA context.
        self.arena.prepare(prefault=self.config.host.prefault)
        self._rows = self.arena.rows()  # one view for every copy (a fresh view per call costs 5-10 us)
        self._promotions: dict[bytes, Future[bool]] = {}
        self._promotion_tiers: dict[bytes, Tier] = {}
        try:
            self.lower = build_chain(self.config, layout, self.slot_bytes)
        except BaseException:
            self.arena.close(unlink=True)
            raise
        self._removed = RemovalLog()
        self.host = HostTier(self.arena, make_policy(self.config.host.policy, num_slots), layout.block_bytes,
                             on_evict=self._demote)
        if (disk := self.disk) is not None:
            disk.held_above = self.host.holds  # host and disk hold mostly different blocks (docs/policy.md)
            disk.on_forget = self._forgotten_below
        self.transfer = transfer or make_transfer_engine(self.config.transfer)
        self._poll = self.transfer.poll if self.transfer.completes_on_poll else None
        self._epochs = KeyEpochs(self.disk)
        self._through: WriteThroughQueue | None = None
        if any(tier.write_mode == "through" for tier in self.lower.tiers):
            # Half the pool at most: the pinned slots are slots the host cannot evict for new puts.
            queue_slots = min(self.config.host.write_through_queue_bytes // self.slot_bytes, num_slots // 2)
            self._through = WriteThroughQueue(queue_slots, self._offer_through, self._unpin)

    # -- keys ---------------------------------------------------------------------------------------

    def hasher(self, model_id: str, tp_rank: int = 0, tp_size: int = 1, tenant_salt: str = "") -> BlockHasher:
        """A ``BlockHasher`` for this store's layout and hash algorithm in the given namespace."""
        namespace = Namespace.for_layout(model_id, self.layout, tp_rank, tp_size, tenant_salt)
        algo: HashAlgo = self.config.hash_algo  # type: ignore[assignment]
        return BlockHasher(namespace, self.layout.block_tokens, algo)

    @property
    def disk(self) -> DiskTier | None:
        """The disk tier, if configured (for its own calls and stats; the store goes through ``lower``)."""
        from kvtier.tiers.disk import DiskAdapter

        adapter = self.lower.get("disk")
        return adapter.tier if isinstance(adapter, DiskAdapter) else None

    def epoch(self, scope: str) -> int:
        """The key epoch of ``scope``: 0 until advanced (``InvalidInputError`` for a malformed scope)."""
        self._check_open()
        return self._epochs.get(scope)

    def advance_epoch(self, scope: str) -> int:
        """Advance ``scope``'s key epoch and return the new one; with a disk tier it is durable on return."""
        self._check_open()
        return self._epochs.advance(scope)

    # -- lookup -------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], *, prefetch: bool = True, scope: str | None = None) -> LookupResult:
        """The longest leading run of ``keys`` present in some tier; lower-tier hits are prefetched into host.

        With ``scope``, the result also carries that scope's current key epoch (``LookupResult.epoch``).
        """
        keys = check_keys(keys)
        epoch = None if scope is None else self._epochs.get(scope)
        found = self._locate(keys)
        tiers = [tier for tier, _ in found]
        with self._lock:
            self._check_open()
            self._counters["lookups"] += 1
            self._counters["hit_blocks"] += len(tiers)
            self._counters["miss_blocks"] += len(keys) - len(tiers)
            self._counters["host_hit_blocks"] += tiers.count(Tier.HOST)
            for tier in set(tiers) - {Tier.HOST}:
                self.lower.count_hits(tier.value, tiers.count(tier))
            if self.lower:
                self.lower.on_access(keys, [True] * len(tiers) + [False] * (len(keys) - len(tiers)))
                if prefetch:
                    run = frozenset(keys[: len(found)])
                    for key, (tier, lower) in zip(keys, found, strict=False):
                        if tier is not Tier.HOST and key not in self._promotions:
                            self._start_promotion(key, lower, protected=run)
        return LookupResult(len(tiers), tuple(tiers), epoch)

    def _locate(self, keys: list[bytes]) -> list[tuple[Tier, LowerTier | None]]:
        """The tier of each key of the leading run present (and the lower tier to promote it from).

        The host and promotions in flight answer under the lock; the lower tiers are asked outside it (a
        remote tier's answer is one round trip), about the keys the host lacks only.
        """
        host = Tier.HOST
        with self._lock:
            self._check_open()
            ready = self.host.ready_flags(keys)
            promoting = self._promotion_tiers
            tiers: list[Tier | None] = ([promoting.get(key) or (host if flag else None) for key, flag in
                                         zip(keys, ready, strict=True)] if promoting else
                                        [host if flag else None for flag in ready])
        lowers: list[LowerTier | None] = [None] * len(keys)
        if None in tiers and self.lower:
            missing = [i for i, tier in enumerate(tiers) if tier is None]
            asked = keys if len(missing) == len(keys) else [keys[i] for i in missing]
            for i, lower in zip(missing, self.lower.locate(asked), strict=True):
                if lower is not None:
                    tiers[i], lowers[i] = _TIERS[lower.name], lower
        length = tiers.index(None) if None in tiers else len(tiers)
        return list(zip(tiers[:length], lowers[:length], strict=True))  # type: ignore[arg-type]

    def contains(self, key: bytes) -> Tier | None:
        """The tier holding ``key`` (host first, then the lower tiers in order), or ``None``."""
        found = self._locate(check_keys([key]))
        return found[0][0] if found else None

    # -- put ----------------------------------------------------------------------------------------

    def put(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> Job:
        """Copy ``blocks[i]`` into the store under ``keys[i]``, asynchronously.

        Keys already present are skipped (deduplicated). Blocks that cannot get a host slot (every slot
        pinned or in flight) are reported as failed; the earliest keys get slots first, since a prefix is
        worth more than its tail. The caller must not change ``blocks`` until the job is done.
        """
        keys = check_keys_and_blocks(self.layout, keys, blocks)
        self._pin_for_blocks(blocks)
        job = Job("put", len(keys), self._poll)
        with self._lock:
            self._check_open()
            todo = [i for i, key in enumerate(keys) if not self._present_or_writing(key)]
            self._counters["put_deduplicated_blocks"] += len(keys) - len(todo)
            slots = self.host.reserve_upto([keys[i] for i in todo])
            stored, refused = todo[: len(slots)], todo[len(slots) :]
            job.fail(refused)
            self._counters["put_failed_blocks"] += len(refused)
            if stored:
                job.add_parts()
        # Reserved slots are this call's alone, so the copies are queued outside the lock: a completion
        # callback never waits for us. One job for the whole call (one submission: a kernel launch on CUDA);
        # the engine splits it across its workers, and the slots are committed when it completed.
        if stored:
            copy = submit_or_fail(self.transfer, self._rows, slots, [blocks[i] for i in stored], Direction.STORE,
                                  self._on_put_done(job, stored, [keys[i] for i in stored]))
            if copy is not None:
                job.add_helper(copy.help)
        return job.seal()

    def _present_or_writing(self, key: bytes) -> bool:
        return self.host.state(key) is not None or self.lower.find_local(key) is not None

    def _on_put_done(self, job: Job, indices: list[int], keys: list[bytes]) -> Callable[[BaseException | None], None]:
        def on_done(error: BaseException | None) -> None:
            with self._lock:
                if error is not None:
                    self.host.abort(keys)
                    self._counters["put_failed_blocks"] += len(keys)
                    job.part_done(indices)
                    return
                self.host.commit(keys)
                self._counters["put_blocks"] += len(keys)
                self._counters["bytes_put"] += len(keys) * self.layout.block_bytes
                pinned = self._pin_for_write_through(keys)
            self._queue_write_through(pinned)
            job.part_done()

        return on_done

    def _pin_for_write_through(self, keys: Sequence[bytes]) -> list[tuple[bytes, int]]:
        """Under the lock: read-pin the committed ``keys`` for the write-through tiers (none without one)."""
        if self._through is None:
            return []
        # The read pin keeps the slot's bytes in place until every tier has copied or sent them: the queue's
        # thread offers from the slot, and a remote tier sends straight from it (at most remote.queue_bytes
        # of slots pinned), so nobody copies 2 MiB on the committing thread.
        slots = [(key, self.host.acquire([key])[0]) for key in keys]
        return [(key, slot) for key, slot in slots if slot is not None]

    def _queue_write_through(self, pinned: list[tuple[bytes, int]]) -> None:
        """Outside the lock: hand pinned blocks to the write-through queue, waiting for room at most
        ``host.write_through_wait_ms`` (the queue unpins and counts what it skips)."""
        if self._through is not None and pinned:
            self._through.put(pinned, time.monotonic() + self.config.host.write_through_wait_ms / 1000)

    def _offer_through(self, key: bytes, slot: int) -> None:
        """On the queue's thread: offer a pinned block to the write-through tiers; the chain unpins it once
        no tier borrows it (also when a tier raises). A local disk tier checksums and copies it here, and
        waits for room when its writer is behind."""
        self.lower.write_through(key, self.host.payload(slot), functools.partial(self._unpin, key))

    def _unpin(self, key: bytes) -> None:
        with self._lock:
            self.host.release([key])

    def _demote(self, key: bytes, payload: torch.Tensor) -> None:
        # Never wait for a drive or a server here: this runs in the caller's put, on the engine's critical path.
        if self.lower and self.lower.demote(key, payload):
            self._counters["demoted_blocks"] += 1
        elif self.lower.find(key) is None:
            self._removed.record((key,))

    def _forgotten_below(self, keys: list[bytes]) -> None:
        # Under the disk tier's lock: ``holds`` takes no lock, the log's lock is a leaf, and the disk tier itself
        # is not asked (its lock is not reentrant; it has just dropped these keys).
        others = [tier for tier in self.lower.tiers if tier.name != "disk"]
        self._removed.record([key for key in keys if not self.host.holds(key)
                              and not any(tier.contains(key) for tier in others)])

    def removed_since(self, seq: int) -> Removals:
        """The keys no tier holds any more, removed from sequence number ``seq`` on (``kvtier.removals``).

        Start with the ``next_seq`` of a first call; ``overflowed`` says some removals since ``seq`` were
        forgotten (the log keeps the last ``removals.DEFAULT_CAPACITY_KEYS``) or ``seq`` is not of this store.
        """
        self._check_open()
        return self._removed.since(seq)

    # -- get ----------------------------------------------------------------------------------------

    def get(self, keys: Sequence[bytes], blocks: Sequence[torch.Tensor]) -> Job:
        """Copy the block stored under ``keys[i]`` into ``blocks[i]``, asynchronously.

        Host blocks are pinned and copied; lower-tier blocks are first read into a host slot (promotion,
        already under way if ``lookup`` prefetched them). Absent or corrupt blocks are failed indices of the job.
        """
        keys = check_keys_and_blocks(self.layout, keys, blocks)
        self._pin_for_blocks(blocks)
        job = Job("get", len(keys), self._poll)
        after: object | None = None
        with self._lock:
            self._check_open()
            slots = self.host.acquire(keys)
            ready = [i for i, slot in enumerate(slots) if slot is not None]
            for i, slot in enumerate(slots):
                if slot is not None:
                    continue
                if after is None:
                    # The copy after a promotion is submitted from an I/O thread: order it after this
                    # thread's queued work on the blocks, marked now.
                    after = self.transfer.fence(blocks)
                promotion = self._promotions.get(keys[i]) or self._start_promotion(keys[i])
                if promotion is None:
                    job.fail([i])
                    self._counters["get_failed_blocks"] += 1
                    continue
                job.add_parts()
                promotion.add_done_callback(self._after_promotion(job, i, keys[i], blocks[i], after))
        # Acquired slots stay put until released: copy them outside the lock, as in put.
        if ready:
            self._load(job, ready, [keys[i] for i in ready], [slots[i] for i in ready], [blocks[i] for i in ready])
        return job.seal()

    def _load(self, job: Job, indices: list[int], keys: list[bytes], slots: Sequence[int | None],
              dsts: Sequence[torch.Tensor], after: object | None = None) -> None:
        """Copy acquired host slots into ``dsts`` (aligned with ``indices``) as one submission.

        The pins are released when the copy completed (the engine's event on CUDA), never before.
        """
        job.add_parts()
        acquired = [slot for slot in slots if slot is not None]

        def on_done(error: BaseException | None) -> None:
            with self._lock:
                self.host.release(keys)
                if error is None:
                    self._counters["get_blocks"] += len(keys)
                    self._counters["bytes_got"] += len(keys) * self.layout.block_bytes
                else:
                    self._counters["get_failed_blocks"] += len(keys)
            job.part_done(indices if error is not None else ())

        # A copy that cannot be queued releases its pins and fails its part (a promotion's callback must
        # not raise: its job would never end).
        copy = submit_or_fail(self.transfer, self._rows, acquired, dsts, Direction.LOAD, on_done, after=after)
        if copy is not None:
            job.add_helper(copy.help)

    def _after_promotion(self, job: Job, index: int, key: bytes, block: torch.Tensor,
                         after: object | None) -> Callable[[Future[bool]], None]:
        def on_promoted(future: Future[bool]) -> None:
            # This callback can run before the I/O thread settled the promotion: settle it here first.
            self._settle_promotion(key, future)
            with self._lock:
                slot = None if self._closed else self.host.acquire([key])[0]
                if slot is None:
                    self._counters["get_failed_blocks"] += 1
                    job.part_done([index])
                    return
                self._load(job, [index], [key], [slot], [block], after)
            job.part_done()

        return on_promoted

    # -- promotion (lower tier -> host) ----------------------------------------------------------------

    def _start_promotion(self, key: bytes, tier: LowerTier | None = None,
                         protected: frozenset[bytes] = frozenset()) -> Future[bool] | None:
        """Read ``key`` from ``tier`` (default: the nearest that holds it, by what the tiers know locally)
        into a fresh host slot; ``None`` if no tier holds it, it is in the host, or no slot is free without
        evicting a ``protected`` block (the other blocks of the prefix being looked up or read)."""
        if tier is None:
            tier = self.lower.find(key)
        if tier is None or self.host.state(key) is not None:
            return None
        try:
            slot = self.host.reserve([key], protected)[0]
        except CapacityError:
            return None
        future = tier.submit_read(key, self.arena.slot(slot))
        self._promotions[key] = future
        self._promotion_tiers[key] = Tier(tier.name)
        future.add_done_callback(lambda done: self._settle_promotion(key, done))
        return future

    def _settle_promotion(self, key: bytes, future: Future[bool]) -> None:
        """Commit (verified bytes) or abort a finished promotion; a second call for it does nothing."""
        with self._lock:
            if self._promotions.get(key) is not future:
                return
            del self._promotions[key]
            tier = self._promotion_tiers.pop(key)
            if not future.cancelled() and future.exception() is None and future.result():
                self.host.commit([key])
                self._counters["promoted_blocks"] += 1
                if tier is Tier.DISK and not self._closed and (disk := self.disk) is not None:
                    # Only now, with the host copy committed, may the disk drop its copy (if it runs exclusive).
                    disk.moved_to_host(key)
            else:
                self.host.abort([key])
                self._counters["promotion_failed_blocks"] += 1
                if self.lower.find(key) is None:  # gone below meanwhile: its eviction saw the host's slot
                    self._removed.record((key,))

    # -- zero-copy path -------------------------------------------------------------------------------

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        """Reserve host slots for the absent ``keys`` (present ones are ``skipped``); all or ``CapacityError``.

        The caller writes ``block_bytes`` into each ``slot_view(slot)``, then calls ``commit`` (the blocks
        become readable) or ``abort`` (they never do).
        """
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            present = {key for key in keys if self._present_or_writing(key)}
            todo = [key for key in keys if key not in present]
            slots = self.host.reserve(todo)
            self._counters["put_deduplicated_blocks"] += len(present)
            return Reservation(tuple(todo), tuple(slots), tuple(k for k in keys if k in present), self.arena.name)

    def commit(self, reservation: Reservation) -> None:
        """Make the reserved blocks readable; ``InvalidInputError`` (nothing changes) for a reservation that
        ended or is not this store's (a key not reserved, or reserved again since in another slot)."""
        with self._lock:
            self._check_open()
            self.host.commit(reservation.keys, self._slots_of(reservation))
            self._counters["put_blocks"] += len(reservation.keys)
            self._counters["bytes_put"] += len(reservation.keys) * self.layout.block_bytes
            pinned = self._pin_for_write_through(reservation.keys)
        self._queue_write_through(pinned)

    def abort(self, reservation: Reservation) -> None:
        """Drop the reserved slots (their blocks never become readable); checked as ``commit``."""
        with self._lock:
            self._check_open()
            self.host.abort(reservation.keys, self._slots_of(reservation))

    @staticmethod
    def _slots_of(reservation: Reservation) -> tuple[int, ...] | None:
        """The slots a reservation's keys must still be reserved in; ``None`` for one made by key alone (the
        daemon's sessions, which keep their own record of what each connection reserved)."""
        return reservation.slots if reservation.slots or not reservation.keys else None

    def acquire(self, keys: Sequence[bytes], timeout: float | None = None) -> Lease:
        """Pin the longest leading run of ``keys`` that is readable, promoting lower-tier blocks first (blocking).

        The promotions are waited for at most ``timeout`` seconds (``None``: ``PROMOTION_WAIT_S``); a block
        still in flight then ends the run (it lands in the host pool later).
        """
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            absent = [key for key, ready in zip(keys, self.host.ready_flags(keys), strict=True) if not ready]
            wanted = frozenset(keys) if absent else frozenset()
            pending = {key: self._promotions.get(key) or self._start_promotion(key, protected=wanted)
                       for key in absent}
        deadline = time.monotonic() + (PROMOTION_WAIT_S if timeout is None else timeout)
        for key, future in pending.items():
            if future is not None:
                with contextlib.suppress(TimeoutError):
                    future.exception(max(0.0, deadline - time.monotonic()))
                if future.done():
                    self._settle_promotion(key, future)
        with self._lock:
            self._check_open()
            slots = self.host.acquire_run(keys)
            run = keys[:len(slots)]
            self._counters["get_blocks"] += len(run)
            self._counters["bytes_got"] += len(run) * self.layout.block_bytes
            return Lease(tuple(run), tuple(slots), self.arena.name)

    def lookup_acquire(self, keys: Sequence[bytes]) -> tuple[LookupResult, Lease]:
        """``lookup(keys)``, then ``acquire`` of the run it found: a restore's two calls, with their effects.

        Where the run is all in the host tier and nothing below could lengthen it (it covers every key, or
        there is no lower tier) and no promotion is in flight, both happen in one pass under the lock (the same
        counters, pins and admission sightings; after a model's forward each call of a restore costs 5-20 us).
        Otherwise it is the two calls, so that lower-tier blocks are prefetched and waited for as they say.
        """
        keys = check_keys(keys)
        with self._lock:
            self._check_open()
            if not self._promotion_tiers:
                ready = self.host.ready_flags(keys)
                run = ready.index(False) if False in ready else len(keys)
                if run == len(keys) or not self.lower:
                    slots = self.host.acquire_run(keys[:run])
                    counters = self._counters
                    counters["lookups"] += 1
                    counters["hit_blocks"] += run
                    counters["miss_blocks"] += len(keys) - run
                    counters["host_hit_blocks"] += run
                    counters["get_blocks"] += len(slots)
                    counters["bytes_got"] += len(slots) * self.layout.block_bytes
                    if self.lower:
                        self.lower.on_access(keys, ready)
                    return (LookupResult(run, (Tier.HOST,) * run),
                            Lease(tuple(keys[:len(slots)]), tuple(slots), self.arena.name))
        found = self.lookup(keys)
        return found, self.acquire(keys[:found.num_blocks])

    def release(self, lease: Lease) -> None:
        with self._lock:
            self.host.release(lease.keys)

    def pin_for(self, device: torch.device) -> None:
        """Register the host arena with CUDA for copies on ``device`` (in the background; no-op off CUDA).

        Puts and gets of CUDA tensors call it; a caller that copies slots itself (``slot_rows`` with
        ``PagedKV``) calls it once with its device. Off by ``host.pin = false``.
        """
        if self.config.host.pin and device.type == "cuda":
            self.arena.start_pinning(self.config.host.pin_chunk_bytes, device)

    def _pin_for_blocks(self, blocks: Sequence[torch.Tensor]) -> None:
        for device in {block.device for block in blocks if block.device.type == "cuda"}:
            self.pin_for(device)

    def slot_rows(self, handle: Handle | None = None) -> torch.Tensor:
        """The host arena as a ``(num_slots, slot_bytes)`` uint8 view: row ``slot`` holds that slot's block.

        For in-place copies of reserved or leased slots (``PagedKV.gather_to_slots`` /
        ``scatter_from_slots``); the first ``layout.block_bytes`` bytes of a row are the block. A ``handle``
        of another arena raises ``StaleHandleError``.
        """
        self._check_open()
        self._check_generation(handle)
        return self.arena.rows()

    def slot_view(self, slot: int, handle: Handle | None = None) -> torch.Tensor:
        """The block bytes of host slot ``slot`` (``handle``'s arena checked) as a flat tensor of the layout's dtype."""
        self._check_generation(handle)
        return self.host.payload(slot).view(self.layout.torch_dtype)

    def _check_generation(self, handle: Handle | None) -> None:
        if handle is not None and handle.generation not in ("", self.arena.name):
            raise StaleHandleError(f"a handle of arena {handle.generation!r}, not of this store's {self.arena.name!r}")

    # -- housekeeping -----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the store is closed")

    def flush(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Offer every block committed so far to the write-through tiers, then write what the lower tiers hold
        in memory (the disk tier's open region, the remote tier's queue).

        Done within ``timeout_s``, else ``FlushTimeoutError`` (a drive or server not keeping up; what is
        queued is still written, and a later flush waits for it).
        """
        with self._lock:
            self._check_open()
        deadline = time.monotonic() + timeout_s
        # Outside the lock: the queue's thread unpins under it, and a remote tier gives lent host slots back
        # (under it too) before it returns.
        if self._through is not None and not self._through.drain(deadline):
            raise FlushTimeoutError(f"blocks were still queued for the write-through tiers after {timeout_s:g} s")
        self.lower.flush(deadline)

    def stats(self) -> StoreStats:
        with self._lock:
            host = self.host.stats()
            c = self._counters
            through = self._through.stats() if self._through is not None else None
            tiers = {
                "host": TierStats(
                    name="host", capacity_blocks=host.capacity_blocks, used_blocks=host.used_blocks,
                    hit_blocks=c["host_hit_blocks"], evicted_blocks=host.evictions,
                    bytes_read=c["bytes_got"], bytes_written=c["bytes_put"],
                    detail=MappingProxyType({"pinned_blocks": host.pinned_blocks,
                                             "writing_blocks": host.writing_blocks,
                                             "pinned_bytes": self.arena.pinned_bytes,
                                             "slot_bytes": self.slot_bytes,
                                             "promoted_blocks": c["promoted_blocks"],
                                             "promotion_failed_blocks": c["promotion_failed_blocks"],
                                             "demoted_blocks": c["demoted_blocks"],
                                             "write_through_queued_blocks": through.queued_blocks if through
                                             else 0})),
            }
            tiers.update(self.lower.stats())
            return StoreStats(
                lookups=c["lookups"], hit_blocks=c["hit_blocks"], miss_blocks=c["miss_blocks"],
                put_blocks=c["put_blocks"], put_deduplicated_blocks=c["put_deduplicated_blocks"],
                put_failed_blocks=c["put_failed_blocks"], get_blocks=c["get_blocks"],
                get_failed_blocks=c["get_failed_blocks"], bytes_put=c["bytes_put"], bytes_got=c["bytes_got"],
                tiers=MappingProxyType(tiers),
                write_through_skipped_blocks=through.skipped_blocks if through else 0,
                write_through_failed_blocks=through.failed_blocks if through else 0,
            )

    def close(self) -> None:
        """Finish queued copies, promotions and write-throughs (waiting at most ``CLOSE_WAIT_S`` for the last
        two), flush and close the lower tiers, release the arena. Idempotent."""
        with self._lock:
            if self._closed:
                return
            promotions = list(self._promotions.items())
        deadline = time.monotonic() + CLOSE_WAIT_S
        unsettled = 0
        for key, future in promotions:
            with contextlib.suppress(TimeoutError):
                future.exception(max(0.0, deadline - time.monotonic()))
            if future.done():
                self._settle_promotion(key, future)
            else:  # its callback settles it if the read ever ends; the arena outlives the tier's reads
                unsettled += 1
        if unsettled:
            _LOG.warning("store close: %d promotion(s) still reading after %.0f s, left behind", unsettled,
                         CLOSE_WAIT_S)
        # The copies' completions queue their write-throughs: the queue closes after them.
        self.transfer.close()
        with self._lock:
            self._closed = True
        if self._through is not None:
            self._through.close(deadline)
        # Outside the lock: a tier's last reads resolve futures whose callbacks take it.
        self.lower.close()
        self.arena.close(unlink=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
