"""``KvtierConnector``: kvtier as a vLLM V1 KV connector (``KVConnectorBase_V1``).

Load it with ``--kv-transfer-config '{"kv_connector": "KvtierConnector", "kv_connector_module_path":
"kvtier_connectors.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {...}}'`` (docs/connectors/vllm.md).

Promises:
- The scheduler-side methods delegate to ``SchedulerSide``, the worker-side ones to ``WorkerSide``; each
  instance builds only its own role's side, and both sides of one engine share one embedded store: in the
  process when vLLM's scheduler and worker share it (``uni``), else a private daemon of the engine (``mp``,
  vLLM's default on the CPU and with tensor parallelism).
- A configuration kvtier cannot serve (several KV cache groups, a layout it cannot store, a
  pipeline-parallel deployment, decode or prefill context parallelism, the embedded store under an executor
  that may place ranks on other hosts) fails at construction or at ``register_kv_caches``
  with a ``ConfigError`` or ``LayoutMismatchError`` that says what to change; it never stores garbage.
- It does not declare ``SupportsHMA``: vLLM then turns its hybrid KV cache manager off by itself, so
  sliding-window models (Gemma 2/3, gpt-oss) run with every layer keeping all its tokens, which kvtier stores.
- It never needs piecewise CUDA graphs (synchronous loads are in place before the forward starts), never
  holds a finished request's blocks, and is a best-effort cache (``requires_kv_delivery`` is False).
- ``reset_cache`` (vLLM's ``reset_prefix_cache(reset_connector=True)``) puts everything stored before out of
  reach; ``take_events`` reports the chunks every writing rank committed (the workers' commit reports ride
  on ``KvtierWorkerMeta``); ``get_kv_connector_stats`` counts loads and saves
  (rank 0's: vLLM sums the ranks' reports, and every rank runs the same plan).
- The commit rule (scheduler.py, worker.py): each step's output carries ``KvtierWorkerMeta`` (the step it
  ran); ``update_connector_output`` reads it with vLLM's merged load errors, and the verdict travels to the
  workers in a later step's plan. ``has_pending_push_work`` keeps vLLM stepping until every verdict went out.
- The default ``model_id`` names the weights, not the ``--model`` string, and the options that change the KV
  they compute (``model_identity``); a vLLM outside
  the supported range (``versions.SUPPORTED``) logs a warning once and still starts.
- Safe ``prefix_caching_hash_algo`` settings: ``sha256`` (vLLM's default) and ``sha256_cbor`` give the same
  hashes in every process that shares ``PYTHONHASHSEED`` (unset everywhere, or one value everywhere);
  ``sha256_cbor`` also across Python versions. ``xxhash`` and ``xxhash_cbor`` draw a random seed per process
  unless ``PYTHONHASHSEED`` is set, so blocks saved by one process are never found by another; with a shared
  seed they work but are not collision resistant (trusted single-tenant use only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm import __version__ as vllm_version
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.errors import ConfigError, InvalidInputError
from kvtier_connectors.model_identity import VLLM_KV_OPTIONS, model_identity
from kvtier_connectors.vllm.metadata import KvtierMetadata, KvtierWorkerMeta
from kvtier_connectors.vllm.scheduler import SchedulerSide
from kvtier_connectors.vllm.settings import (
    ChunkKeys,
    ConnectorSettings,
    drafts_over_next_token,
    kv_head_replicas,
    layout_from_kv_cache_config,
    open_store,
    release_store,
    store_name,
)
from kvtier_connectors.vllm.stats import KvtierStats, chunk_stored_event, chunks_removed_event
from kvtier_connectors.vllm.versions import check_vllm_version
from kvtier_connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by a kvtier store."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        check_vllm_version(vllm_version)
        model_config = vllm_config.model_config
        default_model_id = "" if extra.get("model_id") else model_identity(
            str(model_config.model), getattr(model_config, "revision", None),
            {name: getattr(model_config, name, None) for name in VLLM_KV_OPTIONS})
        self.settings = ConnectorSettings.from_extra_config(extra, default_model_id)
        parallel = vllm_config.parallel_config
        tp_size, pp_size = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        executor = getattr(parallel, "distributed_executor_backend", None)
        context_parallel = {name: int(getattr(parallel, name, 1) or 1) for name in
                            ("decode_context_parallel_size", "prefill_context_parallel_size")}
        if any(size > 1 for size in context_parallel.values()):
            # Each rank then holds a slice of every block's tokens, which kvtier's keys do not describe.
            raise ConfigError(f"kvtier does not support context parallelism (got {context_parallel})")
        if pp_size > 1:
            # Each pipeline stage holds other layers: a store serves one layout, so stages cannot share one.
            raise ConfigError(f"pipeline_parallel_size must be 1 with kvtier (got {pp_size})")
        engine_id = ""
        if self.settings.store == "embedded" and executor not in (None, "uni"):
            if executor != "mp":
                # Ray or an external launcher may place ranks on other hosts or give each its own scheduler.
                raise ConfigError(f"the embedded store serves one engine on one host; with distributed_executor_"
                                  f"backend {executor!r} run `kvtier serve` on every host and set store='daemon'")
            # Workers in processes of their own share the engine's private daemon (engine_store.py), named by
            # the id vLLM gives the engine's config (its workers receive the same config).
            engine_id = str(getattr(vllm_config, "instance_id", "") or "")
            if not engine_id:
                raise ConfigError("vLLM names no instance_id for this engine, so its processes cannot find one "
                                  "embedded store; run `kvtier serve` and set store='daemon'")
        self.layout, self.geometry = layout_from_kv_cache_config(kv_cache_config, self.settings.block_tokens)
        kv_replicas = 1 if self.layout.kind == "latent" else kv_head_replicas(
            int(model_config.get_total_num_kv_heads()), tp_size)
        # Each role its own daemon connection (one store for all when embedded): see settings.open_store.
        roles = ("scheduler",) if role == KVConnectorRole.SCHEDULER else ("worker", "load")
        self._store_names = [store_name(self.settings, name, engine_id) for name in roles]
        stores = [open_store(self.settings, self.layout, name, engine_id) for name in roles]
        self.store = stores[0]
        self._released = False
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            # Removals are read from the store at every step (a round trip to a daemon): only for an engine that
            # publishes KV events.
            events = vllm_config.kv_events_config
            publishing = events is not None and events.enable_kv_cache_events
            self.scheduler_side = SchedulerSide(self.settings, self.layout, self.geometry, self.store, tp_size,
                                                chunk_stored_event, chunks_removed_event if publishing else None,
                                                kv_replicas=kv_replicas,
                                                eagle_drafts=drafts_over_next_token(vllm_config.speculative_config))
        rank = 0
        if role != KVConnectorRole.SCHEDULER:
            if tp_size > 1:
                from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            keys = ChunkKeys(self.settings, self.layout, self.geometry, rank, tp_size, kv_replicas)
            self.worker_side = WorkerSide(self.layout, self.geometry, self.store, keys, stores[1])
        # vLLM sums the workers' stats over ranks, which run the same plan: rank 0 alone reports them.
        self._reports_stats = rank == 0
        self._reported = (0, 0, 0)

    @property
    def requires_kv_delivery(self) -> bool:
        # A dropped save is a later miss: in-flight output survives preemption under async scheduling.
        return False

    def _scheduler(self) -> SchedulerSide:
        if self.scheduler_side is None:
            raise InvalidInputError("a scheduler-side method was called on a worker-side connector")
        return self.scheduler_side

    def _worker(self) -> WorkerSide:
        if self.worker_side is None:
            raise InvalidInputError("a worker-side method was called on a scheduler-side connector")
        return self.worker_side

    # -- scheduler side ------------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self._scheduler().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else []
        self._scheduler().update_state_after_alloc(request, list(block_ids), num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        disk = self._scheduler().load_came_from_disk(request)
        return {CacheHitSource.DISK if disk else CacheHitSource.HOST: num_external_tokens}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler().build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().request_finished(request), None

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        invalid = set(connector_output.invalid_block_ids or ())
        if isinstance(meta, KvtierWorkerMeta):
            self._scheduler().settle(meta.step, invalid, meta.committed, meta.lost)
        else:
            self._scheduler().settle(None, invalid)

    def has_pending_push_work(self) -> bool:
        # Saves wait for a later step's verdict: an idle engine steps on until it is sent.
        return self.scheduler_side is not None and self.scheduler_side.has_unsettled_saves()

    def reset_cache(self) -> bool:
        return self._scheduler().reset_cache()

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self._scheduler().take_events()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvtierStats(data=dict(data)) if data is not None else KvtierStats()

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def _metadata(self) -> KvtierMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierMetadata):
            raise InvalidInputError(f"expected KvtierMetadata, got {type(meta).__name__}")
        return meta

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        worker = self.worker_side
        if worker is None or not self._reports_stats:
            return None
        now = (worker.loaded_chunks, worker.failed_chunks, worker.saved_chunks)
        loaded, failed, saved = (a - b for a, b in zip(now, self._reported, strict=True))
        self._reported = now
        if not (loaded or failed or saved):
            return None
        return KvtierStats(data={"loaded_chunks": loaded, "failed_chunks": failed, "saved_chunks": saved})

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker().start_load_kv(self._metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker().wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker().save_kv_layer(layer_name, self._metadata())

    def wait_for_save(self) -> None:
        self._worker().wait_for_save(self._metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        worker = self._worker()
        committed, lost = worker.take_commit_reports()
        return KvtierWorkerMeta(worker.step, committed, lost)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()
        if not self._released:
            self._released = True
            for name in self._store_names:
                release_store(name)
