"""What the vLLM connector reads from vLLM's configuration, and the stores and keys it derives from it.

Promises:
- ``ConnectorSettings.from_extra_config`` accepts exactly the keys of ``kv_connector_extra_config``
  documented in docs/connectors/vllm.md (``ConfigError`` names an unknown key or a bad value).
- ``layout_from_kv_cache_config`` maps vLLM's KV cache spec onto a ``KVLayout``; anything kvtier cannot
  store as whole pages (several cache groups, sliding-window or Mamba groups, quantized KV, a kvtier block
  that is not a whole number of vLLM blocks) is a ``ConfigError`` that says what to change.
- ``ChunkKeys`` turns vLLM's chained block hashes into kvtier keys: ``key = H(namespace root || vLLM hash of
  the chunk's last hash block)``. The namespace covers the model, the layout, vLLM's in-page byte order
  (``kv_cache_layout``), the slice of the KV a rank holds and the tenant salt, so every process of a
  deployment that hashes prompts alike agrees on the keys, and blocks of another model, layout, page format
  or KV slice never match. Ranks holding the same KV (MLA's latent on every rank, KV heads replicated when
  there are more ranks than heads: ``kv_head_replicas``) share one key and one stored copy.
- ``open_store`` hands every connector of one process and ``instance`` the same store: an embedded
  ``Store`` (vLLM's scheduler and a single-process worker share it), a ``Client`` of the engine's private
  daemon (an embedded store for an engine whose workers are processes of their own: ``engine_store``), or a
  ``Client`` of the daemon (every process of the host shares it); ``release_store`` closes it after its last
  user, and stops a private daemon this process started once none of its clients is left. A daemon client
  (private or shared) is opened per ``role`` (``scheduler``, ``worker``, ``load``): each has its own
  connection, so a call blocked on one (a disk promotion on the load thread) never holds the others; the
  scheduler's calls have a deadline of ``scheduler_timeout_s`` per socket operation (a stalled daemon is then
  a miss inside ``schedule()``), the worker's and load thread's one of ``worker_timeout_s`` (a stalled daemon
  is then a failed load or a skipped save, never a hung worker; longer than ``PROMOTION_WAIT_S``, so an
  acquire waiting for slow disk reads gets its answer). An embedded store in the engine's process lowers
  the interpreter's switch interval to ``ENGINE_SWITCH_INTERVAL_S`` (never raises it), so kvtier's threads
  do not wait 5 ms for the GIL behind vLLM's busy loop at every hand-off. Stores still open when the
  interpreter exits are closed then (their disk tier flushed), as vLLM's in-process engine never shuts its
  connectors down.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kvtier.config import StoreConfig, config_from_mapping, load_config
from kvtier.daemon import Client
from kvtier.errors import ConfigError, InvalidInputError, LayoutMismatchError
from kvtier.keys import KEY_BYTES, Namespace
from kvtier.layout import KVLayout, dtype_name
from kvtier.store import PROMOTION_WAIT_S, Store

StoreKind = Literal["embedded", "daemon"]
_KEY_DOMAIN = b"kvtier-vllm-chunk-v1"
_KNOWN_KEYS = {"store", "instance", "model_id", "block_tokens", "config_path", "config", "tenant_salt",
               "sync_load_bytes", "sync_disk_load_bytes", "scheduler_timeout_s",
               "worker_timeout_s"}
DEFAULT_SYNC_LOAD_BYTES = 256 << 20
DEFAULT_SYNC_DISK_LOAD_BYTES = 32 << 20
DEFAULT_SCHEDULER_TIMEOUT_S = 1.0
DEFAULT_WORKER_TIMEOUT_S = PROMOTION_WAIT_S + 30.0
# The interpreter's switch interval in an engine process that holds an embedded store (as ``kvtier serve``).
ENGINE_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's part of ``kv_connector_extra_config``; defaults are documented in docs/connectors/vllm.md."""

    store: StoreKind = "embedded"
    instance: str = "default"
    model_id: str = ""
    block_tokens: int = 0
    config_path: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    tenant_salt: str = ""
    sync_load_bytes: int = DEFAULT_SYNC_LOAD_BYTES
    sync_disk_load_bytes: int = DEFAULT_SYNC_DISK_LOAD_BYTES
    scheduler_timeout_s: float = DEFAULT_SCHEDULER_TIMEOUT_S
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any], default_model_id: str) -> ConnectorSettings:
        unknown = set(extra) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(f"unknown kvtier key(s) in kv_connector_extra_config: {sorted(unknown)}; "
                              f"known: {sorted(_KNOWN_KEYS)}")
        settings = cls(
            store=extra.get("store", "embedded"),
            instance=str(extra.get("instance", "default")),
            model_id=str(extra.get("model_id") or default_model_id),
            block_tokens=extra.get("block_tokens", 0),
            config_path=str(extra.get("config_path", "")),
            config=extra.get("config", {}),
            tenant_salt=str(extra.get("tenant_salt", "")),
            sync_load_bytes=extra.get("sync_load_bytes", DEFAULT_SYNC_LOAD_BYTES),
            sync_disk_load_bytes=extra.get("sync_disk_load_bytes", DEFAULT_SYNC_DISK_LOAD_BYTES),
            scheduler_timeout_s=extra.get("scheduler_timeout_s", DEFAULT_SCHEDULER_TIMEOUT_S),
            worker_timeout_s=extra.get("worker_timeout_s", DEFAULT_WORKER_TIMEOUT_S),
        )
        if settings.store not in ("embedded", "daemon"):
            raise ConfigError(f"store must be 'embedded' or 'daemon', got {settings.store!r}")
        if not isinstance(settings.block_tokens, int) or settings.block_tokens < 0:
            raise ConfigError(f"block_tokens must be a non-negative int (0: vLLM's block size), got "
                              f"{settings.block_tokens!r}")
        for name in ("sync_load_bytes", "sync_disk_load_bytes"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative int (bytes of synchronous loads per step), "
                                  f"got {value!r}")
        for name in ("scheduler_timeout_s", "worker_timeout_s"):
            timeout = getattr(settings, name)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
                raise ConfigError(f"{name} must be a positive number of seconds, got {timeout!r}")
        if not isinstance(settings.config, Mapping):
            raise ConfigError("config must be a mapping shaped like kvtier's TOML file")
        if not settings.model_id:
            raise ConfigError("model_id is empty and vLLM names no model")
        return settings


@dataclass(frozen=True)
class VllmGeometry:
    """What the connector needs of vLLM's KV cache config, read once per process."""

    layer_names: tuple[str, ...]
    vllm_block_tokens: int
    hash_block_tokens: int
    num_blocks: int
    page_format: str


def layout_from_kv_cache_config(kv_cache_config: Any, block_tokens: int) -> tuple[KVLayout, VllmGeometry]:
    """The kvtier layout of one vLLM worker's KV, with ``block_tokens`` tokens per kvtier block (0: vLLM's)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(
            f"kvtier stores one KV cache group, this model has {len(groups)}; start vLLM with "
            "--disable-hybrid-kv-cache-manager so that every layer shares one group"
        )
    spec = groups[0].kv_cache_spec
    # With the hybrid manager off vLLM turns sliding-window layers into full-attention ones that keep every
    # token (``sliding_window`` stays set as a hint), so their pages are whole and storable.
    if type(spec) not in (FullAttentionSpec, MLAAttentionSpec):
        raise ConfigError(f"kvtier stores full-attention KV only, not {type(spec).__name__}; a hybrid model "
                          "needs --disable-hybrid-kv-cache-manager")
    if getattr(getattr(spec, "kv_quant_mode", None), "name", "NONE") != "NONE":
        raise ConfigError("kvtier does not store quantized KV (kv_quant_mode must be NONE)")
    latent = isinstance(spec, MLAAttentionSpec)
    vllm_block = int(spec.block_size)
    hash_block = int(getattr(kv_cache_config, "hash_block_size", None) or vllm_block)
    tokens = block_tokens or vllm_block
    if tokens % vllm_block or tokens % hash_block:
        raise ConfigError(f"block_tokens={tokens} must be a multiple of vLLM's block size {vllm_block} "
                          f"and of its hash block size {hash_block}")
    layout = KVLayout(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=1 if latent else int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        dtype=dtype_name(spec.dtype),
        block_tokens=tokens,
        kind="latent" if latent else "kv",
    )
    geometry = VllmGeometry(
        layer_names=tuple(groups[0].layer_names),
        vllm_block_tokens=vllm_block,
        hash_block_tokens=hash_block,
        num_blocks=int(kv_cache_config.num_blocks),
        page_format=str(getattr(kv_cache_config, "kv_cache_layout", None) or "default"),
    )
    return layout, geometry


def drafts_over_next_token(speculative_config: Any) -> bool:
    """Whether vLLM's speculative decoding builds a draft layer's KV at a position from the next token
    (EAGLE, EAGLE3, MTP): such KV is not named by the chunk hashes, which end at the position itself."""
    if speculative_config is None:
        return False
    needs_drop = getattr(speculative_config, "needs_eagle_block_drop", None)  # vLLM 0.33; 0.32 has use_eagle
    return bool(needs_drop() if needs_drop is not None else speculative_config.use_eagle())


def kv_head_replicas(total_kv_heads: int, tp_size: int) -> int:
    """How many tensor-parallel ranks hold each KV head: vLLM replicates heads over ranks when there are more
    ranks than heads (``tp_size`` a multiple of the heads), and splits them otherwise (1)."""
    if total_kv_heads < 1 or tp_size <= total_kv_heads:
        return 1
    if tp_size % total_kv_heads:
        raise ConfigError(f"tensor_parallel_size {tp_size} is not a multiple of the model's {total_kv_heads} KV "
                          "heads, so vLLM cannot replicate them evenly")
    return tp_size // total_kv_heads


class ChunkKeys:
    """kvtier keys of one rank's chunks (kvtier blocks), from vLLM's chained block hashes.

    ``epoch`` (set by ``reset_cache``) is part of the namespace. Ranks that hold the same KV share keys, and
    only the first of them (``writer``) saves: latent (MLA) KV is the same on every rank, and with more ranks
    than KV heads vLLM gives each head to ``kv_replicas`` consecutive ranks. The namespace names the KV a rank
    holds (``key_rank`` of ``num_key_ranks``), so a deployment of another TP size holding the same head slices
    shares its keys.
    """

    def __init__(self, settings: ConnectorSettings, layout: KVLayout, geometry: VllmGeometry,
                 tp_rank: int = 0, tp_size: int = 1, kv_replicas: int = 1, epoch: str = "") -> None:
        self._args = (settings, layout, geometry, tp_rank, tp_size, kv_replicas)
        self.epoch = epoch
        salt = f"vllm:{geometry.page_format}"
        if settings.tenant_salt:
            salt += f":{settings.tenant_salt}"
        if epoch:
            salt += f":epoch={epoch}"
        replicas = tp_size if layout.kind == "latent" else kv_replicas
        if replicas < 1 or tp_size % replicas:
            raise ConfigError(f"{replicas} ranks per KV head do not divide tensor_parallel_size {tp_size}")
        self.key_rank, self.num_key_ranks = tp_rank // replicas, tp_size // replicas
        self.writer = tp_rank % replicas == 0
        namespace = Namespace.for_layout(settings.model_id, layout, self.key_rank, self.num_key_ranks, salt)
        self._root = hashlib.sha256(_KEY_DOMAIN + namespace.encode()).digest()
        self.hashes_per_chunk = layout.block_tokens // geometry.hash_block_tokens

    def with_epoch(self, epoch: str) -> ChunkKeys:
        return ChunkKeys(*self._args, epoch=epoch)

    def num_chunks(self, block_hashes: Sequence[bytes]) -> int:
        """Whole chunks covered by ``block_hashes``."""
        return len(block_hashes) // self.hashes_per_chunk

    def chunk_hash(self, block_hashes: Sequence[bytes], chunk: int) -> bytes:
        """vLLM's hash of chunk ``chunk``'s last hash block: it names the whole prefix up to the chunk's end."""
        value = block_hashes[(chunk + 1) * self.hashes_per_chunk - 1]
        if not isinstance(value, bytes):
            raise InvalidInputError(f"vLLM block hashes must be bytes, got {type(value).__name__}")
        return value

    def key(self, chunk_hash: bytes) -> bytes:
        return hashlib.sha256(self._root + chunk_hash).digest()[:KEY_BYTES]

    def keys(self, chunk_hashes: Sequence[bytes]) -> list[bytes]:
        return [self.key(chunk_hash) for chunk_hash in chunk_hashes]


BlockStore = Store | Client


@dataclass
class _Shared:
    store: BlockStore
    users: int
    engine_socket: str = ""  # the engine's private daemon this store is a client of (``engine_store``)


_stores: dict[str, _Shared] = {}
_stores_lock = threading.Lock()


def _store_config(settings: ConnectorSettings) -> StoreConfig:
    if settings.config_path and settings.config:
        raise ConfigError("give config_path or config, not both")
    config = load_config(settings.config_path) if settings.config_path else config_from_mapping(settings.config)
    if settings.store == "daemon" and not config.daemon.connect:
        # store='daemon' with no address: the local daemon's default socket.
        config = replace(config, daemon=replace(config.daemon, connect="unix"))
    return config


def store_name(settings: ConnectorSettings, role: str, engine_id: str = "") -> str:
    """The name ``open_store`` files the store of ``role`` under (``release_store`` takes it back)."""
    if (settings.store != "daemon" and not engine_id) or not role or settings.instance in _stores:
        return settings.instance  # one embedded store per instance (or one adopted store for every role)
    return f"{settings.instance}/{role}"


def open_store(settings: ConnectorSettings, layout: KVLayout, role: str = "", engine_id: str = "") -> BlockStore:
    """The process's store named ``settings.instance`` for ``role``, created on first use; pair with
    ``release_store(store_name(settings, role, engine_id))``.

    ``store='embedded'``: a ``Store`` in this process, for every role, or, with ``engine_id`` (an engine whose
    scheduler and workers are separate processes), a ``Client`` of that engine's private daemon
    (``engine_store``), one per role. ``store='daemon'``: a ``Client`` of the local ``kvtier serve``
    (``config.daemon.connect``, default its Unix socket), one per role. Each client has its own connection;
    the ``scheduler`` one has ``scheduler_timeout_s`` as its deadline, the others ``worker_timeout_s``.
    """
    with _stores_lock:
        name = store_name(settings, role, engine_id)
        shared = _stores.get(name)
        if shared is None:
            config = _store_config(settings)
            timeout = settings.scheduler_timeout_s if role == "scheduler" else settings.worker_timeout_s
            store: BlockStore
            engine_socket = ""
            if settings.store == "daemon":
                store = Client(layout, config, timeout=timeout)
            elif engine_id:
                from kvtier_connectors.vllm.engine_store import engine_socket_path, open_engine_store

                source = {"config_path": settings.config_path, "config": dict(settings.config)}
                store = open_engine_store(source, layout, engine_id, settings.instance, timeout=timeout)
                engine_socket = engine_socket_path(engine_id, settings.instance)
            else:
                store = Store(layout, config)
                # vLLM's busy loop holds the GIL; kvtier's load, copy and disk threads each wait for it at
                # every hand-off, up to the switch interval (5 ms by default) each time (docs/connectors/vllm.md).
                sys.setswitchinterval(min(sys.getswitchinterval(), ENGINE_SWITCH_INTERVAL_S))
            shared = _stores[name] = _Shared(store, 0, engine_socket)
        elif shared.store.layout != layout:
            raise LayoutMismatchError(
                f"store instance {settings.instance!r} holds {shared.store.layout}, this connector needs {layout}"
            )
        shared.users += 1
        return shared.store


def _close_at_exit() -> None:
    """Close the stores still open when the interpreter exits: vLLM's in-process engine never shuts its
    connectors down, and closing is what writes the disk tier's pending blocks and index for the next start.

    Registered with ``threading._register_atexit``: those hooks run at interpreter exit before the thread
    pools stop taking work (their own hook is registered earlier and runs later), which the disk tier's
    writer needs; a plain ``atexit`` hook runs after that and its writes are refused.
    """
    with _stores_lock:
        left = list(_stores.items())
        _stores.clear()
    for _, shared in left:
        shared.store.close()
    _stop_engine_stores({shared.engine_socket for _, shared in left if shared.engine_socket})


def _stop_engine_stores(sockets: set[str]) -> None:
    """Stop the private daemons on ``sockets`` that this process started (``stop_engine_store`` ignores others)."""
    if sockets:
        from kvtier_connectors.vllm.engine_store import stop_engine_store

        for path in sockets:
            stop_engine_store(path)


threading._register_atexit(_close_at_exit)  # type: ignore[attr-defined]


def adopt_store(instance: str, store: BlockStore) -> None:
    """Make ``store`` the process's store named ``instance`` (for tests and embedding applications).

    Connectors opened afterwards with that ``instance`` use it; ``release_store`` by the last of them closes it.
    """
    with _stores_lock:
        if instance in _stores:
            raise ConfigError(f"store instance {instance!r} is already open")
        _stores[instance] = _Shared(store, 0)


def release_store(instance: str) -> None:
    """Drop one user of the store ``instance``; the last one closes it."""
    with _stores_lock:
        shared = _stores.get(instance)
        if shared is None:
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _stores[instance]
        # A private daemon serves every role's client of this process: stop it after the last one.
        last = shared.engine_socket and all(other.engine_socket != shared.engine_socket for other in _stores.values())
    shared.store.close()
    if last:
        _stop_engine_stores({shared.engine_socket})
