"""``KvtierStorage``: kvtier as SGLang's HiCache storage backend (L3), for ``--hicache-storage-backend dynamic``.

SGLang builds it with ``(storage_config, kwargs)``, registers its host pool (``register_mem_pool_host``), then
asks which leading pages of a prefix exist (``batch_exists``), reads pages into host pool slots
(``batch_get_v1``) and writes them from host pool slots (``batch_set_v1``) from its prefetch and backup
threads.

Promises:
- The store opens when the host pool is registered, for the layout of that pool (``HostPages``): a pool
  kvtier cannot serve, or a daemon that serves another layout, raises ``LayoutMismatchError`` there, and
  SGLang fails the attach. A second pool is refused the same way: the sidecar pools of hybrid models, and
  the draft pool of speculative decoding (EAGLE / EAGLE3), with a message that names it.
- Keys cover the KV format (``kv_format``) and the key epoch of the model's scope: ``clear()`` advances that
  epoch in the store (``Store.advance_epoch``), so every page saved before it is unreachable for every rank
  and instance on that store (the bytes age out by eviction); a closed backend raises, so SGLang reports the
  failed clear. ``batch_exists`` learns of an epoch another process advanced from the reply of its own
  lookup (no extra request) and re-derives its keys before it answers; ``batch_get_v1`` and
  ``batch_set_v1`` ask the store for the epoch first (one small request on a daemon, next to the copies of
  up to 128 pages), so no read after another process's clear serves a page saved before it.
- ``batch_exists`` is one ``lookup`` (one daemon round trip, two after another process's clear): the length
  of the leading run of pages present in any tier; disk pages of the run start their promotion at once.
- ``batch_get_v1`` pins the leading run of readable pages and copies each straight from its arena slot into
  the host pool (one copy a page, no staging); it returns ``True`` for that run and ``False`` from the first
  page that is missing, evicted or failed its checksum, which SGLang recomputes. It pins at most half the
  host tier at a time (the rest of a long prefix is read chunk after chunk), so a prefix whose head is on
  disk and whose tail fills the host tier is still read whole. A page is ``True`` only once all its bytes
  are in the host pool.
- ``batch_set_v1`` stores the leading run of pages that fits: pages kvtier lacks are written into reserved
  arena slots and committed, pages already present count as written; when the whole call does not fit it
  stores as long a leading run as it can (halving the part it asks for), and without a tier below the host
  never more than the host tier holds (more would evict the call's own head). It returns ``True`` for the
  stored run and ``False`` after it.
- With an embedded store every rank has a store of its own: with several ranks the disk tier of each lives
  in a per-rank subdirectory (``rank_directory``), and for MLA models every rank stores the latent pages
  itself (SGLang's controller backs up replicated pages only on its storage writer, so the backend marks
  every rank a writer in SGLang's storage config); otherwise ranks other than rank 0 would never hit. With a
  daemon the ranks share one store and MLA pages are written by SGLang's storage writer only.
- ``get_stats`` returns SGLang's ``StorageMetrics`` (pages and GB/s of each read and write since the last
  call) when SGLang enables storage metrics, else ``None``.
- A daemon that is gone, restarting or answering with an error is a miss, never an exception in SGLang's
  prefetch and backup threads (one that raised would end the thread, and with it the other ranks' prefetch
  and the host pages it holds): ``batch_exists`` counts the pages found before the failure, the batch calls
  return ``True`` only for pages completed before it; logged at most once every ``_WARN_EVERY_S``.
- A page read through the daemon counts only if its lease was still held when its copy ended (checked after
  the copies, on the connection that leased it): a connection reopened meanwhile (another thread's call
  timed out) lets the daemon give the slot to another writer, so those pages are a miss.
- Argument errors (host indices that do not match the pages, hashes that are not strings) raise
  ``InvalidInputError`` before anything moves; calls before ``register_mem_pool_host`` or after ``close``
  raise ``ClosedError``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, PoolName

from kvtier.daemon import Client
from kvtier.errors import (
    CapacityError,
    ClosedError,
    ConfigError,
    LayoutMismatchError,
    ProtocolError,
    StaleHandleError,
)
from kvtier.store import Reservation
from kvtier_connectors.sglang.pages import HostPages
from kvtier_connectors.sglang.settings import (
    BlockStore,
    PageKeys,
    Shard,
    StorageSettings,
    kv_format,
    open_store,
    rank_directory,
    sglang_model_id,
)

_DRAFT_POOLS = {PoolName.DRAFT, PoolName.DRAFT_INDEXER, PoolName.DRAFT_SWA}
# A store that keeps failing (a daemon gone for a while) is logged at most this often.
_WARN_EVERY_S = 30.0
log = logging.getLogger(__name__)


class KvtierStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` over a kvtier store; see the module promises."""

    def __init__(self, storage_config: Any, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        self.settings = StorageSettings.from_extra_config(
            storage_config.extra_config, lambda: sglang_model_id(storage_config.model_name or ""))
        self.store: BlockStore | None = None
        self.pages: HostPages | None = None
        self.page_keys: PageKeys | None = None
        self.writes = True
        # Without a tier below the host, a write never asks for more than the host holds.
        self.spills = False
        self.host_blocks = 0
        # Store failures served as misses (a daemon gone or restarting), and when to log the next one.
        self.store_failures = 0
        self._failure_lock = threading.Lock()
        self._next_warning = 0.0
        self._metrics_lock = threading.Lock()
        self._metrics: dict[str, list[float]] = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [],
                                                 "backup_bandwidth": []}

    # -- registration ---------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        if self.store is not None:
            raise ConfigError("a host pool is already registered with this kvtier backend")
        pages = HostPages.of(mem_pool_host)
        if any(getattr(info, "scales", None) is not None for info in getattr(mem_pool_host, "_buffer_infos", ())):
            raise LayoutMismatchError("kvtier does not store block-scaled KV caches (mxfp8): their scales live "
                                      "outside the host pool's pages")
        fmt = kv_format(self.settings, pages.layout.dtype)
        page_keys = PageKeys(self.settings, pages.layout, Shard.of(self.storage_config, replicated=pages.latent), fmt)
        embedded = self.settings.store == "embedded"
        store = open_store(self.settings, pages.layout, rank_directory(self.storage_config) if embedded else "",
                           self.storage_config.pp_rank)
        try:
            page_keys.at(store.epoch(page_keys.scope))
            stats = store.stats()
        except BaseException:
            store.close()
            raise
        super().register_mem_pool_host(mem_pool_host)
        self.pages, self.page_keys = pages, page_keys
        self.spills = any(name != "host" for name in stats.tiers)
        self.host_blocks = stats.tiers["host"].capacity_blocks
        self.writes = not (pages.latent and isinstance(store, Client) and not self.storage_config.is_storage_writer)
        if pages.latent and embedded and self.storage_config.tp_size > 1:
            # Each rank's embedded store holds only what that rank writes: make SGLang back up on every rank.
            self.storage_config.is_mla_model = False
        self.store = store

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if host_pool_name in _DRAFT_POOLS:
            raise LayoutMismatchError(f"kvtier does not store the {host_pool_name} KV pool of speculative decoding "
                                      "(EAGLE / EAGLE3 draft model): run SGLang without --speculative-algorithm, or "
                                      "without kvtier as its HiCache storage backend")
        if host_pool_name != PoolName.KV or host_pool is not getattr(self, "mem_pool_host", None):
            raise LayoutMismatchError(f"kvtier stores the full-attention KV pool only, not the {host_pool_name} "
                                      f"pool of {type(host_pool).__name__} (models with Mamba, SWA or indexer "
                                      "state are not supported)")
        super().register_mem_host_pool_v2(host_pool, host_pool_name)

    def _ready(self) -> tuple[BlockStore, HostPages, PageKeys]:
        if self.store is None or self.pages is None or self.page_keys is None:
            raise ClosedError("the kvtier backend has no registered host pool (or was closed)")
        return self.store, self.pages, self.page_keys

    # -- the page-level interface (interface_v1) --------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        store, _, page_keys = self._ready()
        if not keys:
            return 0
        epoch = page_keys.epoch
        try:
            found = store.lookup(page_keys.keys(keys), scope=page_keys.scope)
            if found.epoch is not None and found.epoch != epoch:
                # Another rank or process cleared this model's pages: count under the current epoch.
                page_keys.at(found.epoch)
                found = store.lookup(page_keys.keys(keys), scope=page_keys.scope)
        except ProtocolError as exc:
            self._store_failed("batch_exists", exc)
            return 0
        return found.num_blocks

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        store, pages, page_keys = self._ready()
        starts = pages.page_starts(host_indices, len(keys))
        chunk = max(1, self.host_blocks // 2)
        started = time.perf_counter()
        found = 0
        try:
            block_keys = self._current_keys(store, page_keys, keys)
            while found < len(keys):
                wanted = block_keys[found : found + chunk]
                lease = store.acquire(wanted)
                held = True
                try:
                    # Slots resolve in the lease's own arena; a daemon restart since the acquire is a miss.
                    for slot, start in zip(lease.slots, starts[found:], strict=False):
                        pages.view(start).copy_(pages.block(store.slot_view(slot, lease)))
                    # The lease lasted through the copies: its connection was not reopened meanwhile.
                    store.slot_rows(lease)
                except StaleHandleError:
                    held = False
                finally:
                    store.release(lease)
                if not held:
                    break
                found += len(lease.keys)
                if len(lease.keys) < len(wanted):
                    break
        except ProtocolError as exc:  # the pages of the failed lease are not counted
            self._store_failed("batch_get_v1", exc)
        self._record("prefetch", found, started)
        return [True] * found + [False] * (len(keys) - found)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        store, pages, page_keys = self._ready()
        starts = pages.page_starts(host_indices, len(keys))
        if not self.writes:
            return [True] * len(keys)
        limit = len(keys) if self.spills else min(len(keys), self.host_blocks)
        started = time.perf_counter()
        stored = 0
        try:
            block_keys = self._current_keys(store, page_keys, keys)
            while stored < limit:
                reservation, count = self._reserve_leading(store, block_keys[stored:limit])
                if reservation is None:
                    break
                start_of = dict(zip(block_keys[stored : stored + count], starts[stored : stored + count],
                                    strict=True))
                try:
                    for key, slot in zip(reservation.keys, reservation.slots, strict=True):
                        pages.block(store.slot_view(slot, reservation)).copy_(pages.view(start_of[key]))
                    store.commit(reservation)
                except StaleHandleError:  # a daemon restart since the reserve: nothing more is stored
                    store.abort(reservation)
                    break
                except BaseException:
                    with contextlib.suppress(ProtocolError):
                        store.abort(reservation)
                    raise
                stored += count
        except ProtocolError as exc:  # the pages of the failed reservation are not counted
            self._store_failed("batch_set_v1", exc)
        self._record("backup", stored, started)
        return [True] * stored + [False] * (len(keys) - stored)

    def _store_failed(self, call: str, error: ProtocolError) -> None:
        """Count a store failure turned into a miss; log it at most once every ``_WARN_EVERY_S``."""
        with self._failure_lock:
            self.store_failures += 1
            now = time.monotonic()
            if now < self._next_warning:
                return
            self._next_warning = now + _WARN_EVERY_S
        log.warning("kvtier: %s served as a miss: the store failed (%s: %s); %d such failures so far", call,
                    type(error).__name__, error, self.store_failures)

    @staticmethod
    def _current_keys(store: BlockStore, page_keys: PageKeys, hashes: list[str]) -> list[bytes]:
        """Keys under the store's current epoch: a read never serves, a write never hides, pages of before a clear."""
        epoch = store.epoch(page_keys.scope)
        if epoch != page_keys.epoch:
            page_keys.at(epoch)
        return page_keys.keys(hashes)

    @staticmethod
    def _reserve_leading(store: BlockStore, keys: list[bytes]) -> tuple[Reservation | None, int]:
        """A reservation of the longest leading part of ``keys`` tried (all, then halves) and its length."""
        count = len(keys)
        while count:
            try:
                return store.reserve(keys[:count]), count
            except CapacityError:
                count //= 2
        return None, 0

    # -- the flat-page interface, which interface_v1 replaces ---------------------------------------------

    def _flat_pages(self) -> ConfigError:
        return ConfigError('kvtier serves the page-level interface only: set "interface_v1": 1')

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        raise self._flat_pages()

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        raise self._flat_pages()

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        raise self._flat_pages()

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        raise self._flat_pages()

    # -- housekeeping -------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop every page of this model (its epoch scope) for every rank and instance on this store."""
        store, _, page_keys = self._ready()
        page_keys.at(store.advance_epoch(page_keys.scope))

    def _record(self, kind: str, num_pages: int, started: float) -> None:
        if not self.storage_config.enable_storage_metrics or not num_pages or self.pages is None:
            return
        seconds = max(time.perf_counter() - started, 1e-9)
        with self._metrics_lock:
            self._metrics[f"{kind}_pgs"].append(num_pages)
            self._metrics[f"{kind}_bandwidth"].append(num_pages * self.pages.layout.block_bytes / seconds / 1e9)

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call (``None`` when SGLang did not enable them)."""
        if not self.storage_config.enable_storage_metrics:
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics

        metrics = StorageMetrics()
        with self._metrics_lock:
            for name, values in self._metrics.items():
                getattr(metrics, name).extend(values)
                values.clear()
        return metrics

    def close(self) -> None:
        """Close the store (an embedded store flushes its disk tier; a client disconnects). Idempotent."""
        store, self.store = self.store, None
        self.pages = self.page_keys = None
        if store is not None:
            store.close()
