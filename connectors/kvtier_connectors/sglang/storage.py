"""``KvtierStorage``: kvtier as SGLang's HiCache storage backend (L3), for ``--hicache-storage-backend dynamic``.

SGLang builds it with ``(storage_config, kwargs)``, registers its host pool (``register_mem_pool_host``), then
asks which leading pages of a prefix exist (``batch_exists``), reads pages into host pool slots
(``batch_get_v1``) and writes them from host pool slots (``batch_set_v1``) from its prefetch and backup
threads.

Promises:
- The store opens when the host pool is registered, for the layout of that pool (``HostPages``): a pool
  kvtier cannot serve, or a daemon that serves another layout, raises ``LayoutMismatchError`` there, and
  SGLang fails the attach. A second pool (the sidecar pools of hybrid models) is refused the same way.
- ``batch_exists`` is one ``lookup`` (one daemon round trip): the length of the leading run of pages present
  in any tier; disk pages of the run start their promotion into host memory at once.
- ``batch_get_v1`` pins the leading run of readable pages in one call and copies each straight from its
  arena slot into the host pool (one copy a page, no staging); it returns ``True`` for that run and
  ``False`` from the first page that is missing, evicted or failed its checksum, which SGLang recomputes.
  Pages are never half-read: a page is ``True`` only once all its bytes are in the host pool.
- ``batch_set_v1`` reserves arena slots for the pages kvtier lacks, copies each straight from the host pool
  and commits them; pages already present count as written. With no room (every slot pinned or being
  written) every page of the call is ``False`` and nothing is stored. On a daemon, MLA ranks other than
  SGLang's storage writer skip the copy: the latent is the same on every rank and the writer stores it.
- Argument errors (host indices that do not match the pages, hashes that are not strings) raise
  ``InvalidInputError`` before anything moves; calls before ``register_mem_pool_host`` or after ``close``
  raise ``ClosedError``.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, PoolName

from kvtier.daemon import Client
from kvtier.errors import CapacityError, ClosedError, ConfigError, LayoutMismatchError, StaleHandleError
from kvtier.store import Reservation
from kvtier_connectors.sglang.pages import HostPages
from kvtier_connectors.sglang.settings import BlockStore, PageKeys, Shard, StorageSettings, open_store


class KvtierStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` over a kvtier store; see the module promises."""

    def __init__(self, storage_config: Any, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        self.settings = StorageSettings.from_extra_config(storage_config.extra_config,
                                                          storage_config.model_name or "")
        self.store: BlockStore | None = None
        self.pages: HostPages | None = None
        self.page_keys: PageKeys | None = None
        self.writes = True

    # -- registration ---------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        if self.store is not None:
            raise ConfigError("a host pool is already registered with this kvtier backend")
        pages = HostPages.of(mem_pool_host)
        page_keys = PageKeys(self.settings, pages.layout, Shard.of(self.storage_config, replicated=pages.latent))
        store = open_store(self.settings, pages.layout)
        super().register_mem_pool_host(mem_pool_host)
        self.pages, self.page_keys = pages, page_keys
        self.writes = not (pages.latent and isinstance(store, Client) and not self.storage_config.is_storage_writer)
        self.store = store

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
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
        return store.lookup(page_keys.keys(keys)).num_blocks

    def exists(self, key: str) -> bool:
        store, _, page_keys = self._ready()
        return store.contains(page_keys.keys([key])[0]) is not None

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        store, pages, page_keys = self._ready()
        starts = pages.page_starts(host_indices, len(keys))
        lease = store.acquire(page_keys.keys(keys))
        found = len(lease.keys)
        if found:
            try:
                # Slots resolve in the lease's own arena; a daemon restart since the acquire is a miss.
                for slot, start in zip(lease.slots, starts, strict=False):
                    pages.view(start).copy_(pages.block(store.slot_view(slot, lease)))
            except StaleHandleError:
                found = 0
            finally:
                store.release(lease)
        return [True] * found + [False] * (len(keys) - found)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        store, pages, page_keys = self._ready()
        starts = pages.page_starts(host_indices, len(keys))
        if not self.writes:
            return [True] * len(keys)
        block_keys = page_keys.keys(keys)
        try:
            reservation = store.reserve(block_keys)
        except CapacityError:
            return [False] * len(keys)
        try:
            return self._write(store, pages, reservation, dict(zip(block_keys, starts, strict=True)), len(keys))
        except StaleHandleError:  # a daemon restart since the reserve: nothing was stored
            return [False] * len(keys)

    @staticmethod
    def _write(store: BlockStore, pages: HostPages, reservation: Reservation, start_of: dict[bytes, int],
               count: int) -> list[bool]:
        try:
            for key, slot in zip(reservation.keys, reservation.slots, strict=True):
                pages.block(store.slot_view(slot, reservation)).copy_(pages.view(start_of[key]))
        except BaseException:
            store.abort(reservation)
            raise
        store.commit(reservation)
        return [True] * count

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

    def close(self) -> None:
        """Close the store (an embedded store flushes its disk tier; a client disconnects). Idempotent."""
        store, self.store = self.store, None
        self.pages = self.page_keys = None
        if store is not None:
            store.close()
