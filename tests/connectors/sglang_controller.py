"""SGLang's real ``HybridCacheController`` storage threads on the CPU, for the kvtier backend's tests.

The controller's ``__init__`` needs a device KV pool, CUDA streams and SGLang's parallel state, so
``storage_controller`` builds it without calling ``__init__`` and sets what ``__init__`` and
``attach_storage_backend`` would set for a ``dynamic`` backend with ``"interface_v1": 1`` (the zero-copy
page functions, the storage config the backend was built with, the tensor-parallel sync groups), then
starts the real storage threads: the prefetch thread (hit query and its MIN all-reduce), the prefetch I/O
thread (128-page ``batch_get_v1`` batches and their acknowledgements), the prefetch sync thread and the
backup thread (``batch_set_v1`` batches, skipped on ranks that are not SGLang's storage writer).

``prefetch`` and ``backup`` play the scheduler's side: they put operations on the controller's queues,
allocate host pages for the hit as the radix cache does and wait (with deadlines) for the acknowledgements.
"""

from __future__ import annotations

import threading
import time
from queue import Empty
from typing import Any

import sglang_pools  # noqa: F401  (declares torchvision's operator schemas before SGLang is imported)
import torch
from sglang.srt.mem_cache.base_prefix_cache import CacheRequestHandle
from sglang.srt.mem_cache.hicache_storage import PoolName
from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
from sglang.srt.mem_cache.pool_host import HostPoolGroup, PoolEntry

DEADLINE_S = 120.0
_request_ids = iter(range(1 << 30))


def storage_controller(backend: Any, pool: Any, *, sync_groups: list[Any] | None = None) -> HybridCacheController:
    """A controller whose storage threads run over ``backend`` (already registered with ``pool``)."""
    controller = HybridCacheController.__new__(HybridCacheController)
    entry = PoolEntry(name=PoolName.KV, host_pool=pool, device_pool=None, layer_mapper=lambda layer: layer,
                      is_primary_index_anchor=True)
    controller.mem_pool_host = HostPoolGroup([entry])
    controller.storage_host_pool = pool
    controller.page_size = pool.page_size
    controller.host_memory_mode = "cache"
    controller.enable_storage_metrics = False
    controller.storage_backend = backend
    controller.storage_backend_type = "dynamic"
    # The config SGLang built the backend with (the same object, as in attach_storage_backend), also when
    # SGLang's failure injector wraps the backend.
    controller.storage_config = getattr(backend, "storage_config", None) or backend._backend.storage_config
    controller.enable_storage = True
    controller.storage_stop_event = threading.Event()
    controller.prefetch_hits_sync_groups = list(sync_groups or [])
    controller.prefetch_completion_sync_groups = list(sync_groups or [])
    controller.page_get_func = controller._page_get_zero_copy
    controller.page_set_func = controller._page_set_zero_copy
    controller.pp_prefetch_command_group = None
    controller.pp_prefetch_command_thread = None
    controller.pp_prefetch_state_lock = threading.Lock()
    controller.pp_prefetch_states = {}
    controller.pp_prefetch_decisions = {}
    controller.extra_host_mem_release_queues = {}
    controller._start_storage_threads()
    return controller


def stop(controller: HybridCacheController) -> None:
    controller._stop_storage_threads()


def _get(queue: Any, what: str) -> Any:
    try:
        return queue.get(timeout=DEADLINE_S)
    except Empty:
        raise TimeoutError(f"no {what} from the controller within {DEADLINE_S} s") from None


def backup(controller: HybridCacheController, host_indices: torch.Tensor, token_ids: list[int]) -> int:
    """Back up ``host_indices`` (the pages of ``token_ids``) through the backup thread; the tokens it stored."""
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    hashes = get_storage_hash_str(token_ids, None, page_size=controller.page_size)
    operation_id = controller.write_storage(host_indices, token_ids, hash_value=hashes)
    operation = _get(controller.ack_backup_queue, "backup acknowledgement")
    assert operation.id == operation_id
    return int(operation.completed_tokens)


def prefetch(controller: HybridCacheController, token_ids: list[int]) -> tuple[int, int, torch.Tensor]:
    """Prefetch ``token_ids`` as the scheduler does: (hit tokens after the rank MIN, tokens read, host indices).

    The host indices hold the pages read (the hit's pages are allocated in the controller's host pool).
    """
    operation = controller.prefetch(CacheRequestHandle(f"r{next(_request_ids)}", 0), token_ids)
    hit = _get(controller.prefetch_hit_queue, "hit query result")
    assert hit is operation
    hit_tokens = operation.storage_hit_count
    host_indices = controller.mem_pool_host.anchor_entry.host_pool.alloc(hit_tokens) if hit_tokens else None
    if host_indices is None:
        return hit_tokens, 0, torch.empty(0, dtype=torch.int64)
    operation.host_indices = host_indices
    controller.prefetch_buffer.put(operation)
    completed = 0
    deadline = time.monotonic() + DEADLINE_S
    while True:
        ack = _get(controller.ack_prefetch_queue, "prefetch acknowledgement")
        assert ack.rid == operation.request_id
        if ack.completed_tokens is not None:
            completed = ack.completed_tokens
        if ack.completed_req:
            return hit_tokens, completed, host_indices
        if time.monotonic() > deadline:
            raise TimeoutError("the prefetch never completed")
