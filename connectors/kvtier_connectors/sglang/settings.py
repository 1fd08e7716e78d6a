"""What the SGLang backend reads from ``--hicache-storage-backend-extra-config``, and the keys it derives.

Promises:
- ``StorageSettings.from_extra_config`` reads kvtier's settings from the ``"kvtier"`` table of SGLang's extra
  config (the keys documented in docs/connectors/sglang.md; ``ConfigError`` names an unknown key or a bad
  value) and insists on ``"interface_v1": 1``, the switch that makes SGLang call the page-level
  ``batch_get_v1`` / ``batch_set_v1``; without it SGLang would hand the backend copied flat pages instead.
- The default ``model_id`` (``sglang_model_id``) names the weights SGLang serves and the options that change
  the KV they compute (``kvtier_connectors.model_identity``: ``--quantization``, ``--json-model-override-args``
  and the others of ``SGLANG_KV_OPTIONS``), not the ``--model-path`` string: a checkpoint quantized at load
  and the same checkpoint unquantized, or two weights served from one path in turn, never share keys.
- ``store_config`` is kvtier's configuration: defaults, then the TOML file ``config_path``, then the ``config``
  mapping over it, table by table. An embedded store of one rank among several (tensor, pipeline or context
  parallel, attention data parallel) keeps its disk tier in a directory of its own under each configured
  path (``rank_directory``), so the ranks of one server never contend for one directory's lock.
- ``kv_format`` names what the page bytes mean: the host pool's dtype, or, where SGLang keeps fp8 KV as
  ``uint8``, the fp8 format it resolved from ``--kv-cache-dtype`` (read from SGLang's runtime config, or the
  ``kv_cache_dtype`` setting); a ``uint8`` pool whose format is unknown, block-scaled formats (mxfp8,
  nvfp4) and a setting that contradicts the pool, or the fp8 format SGLang publishes, raise ``ConfigError`` /
  ``LayoutMismatchError``.
- ``PageKeys`` turns SGLang's chained page hashes (hex strings, each naming its page and the whole prefix
  before it) into kvtier keys: ``key = H(namespace root || page hash)``. The namespace covers the model, the
  kvtier layout (geometry and dtype), the KV format (``kv_format``: e4m3 and e5m2 pages are both ``uint8``),
  the shard (tensor-parallel rank and size for MHA; none for MLA, whose latent is the same on every rank),
  the pipeline stage, the context-parallel rank, the tenant salt and the key epoch, so pages of another
  model, geometry, format or shard, or pages saved before a clear, never match. ``scope`` is the epoch scope
  (the model, layout, format and salt: every shard and instance of one model shares it) and ``at(epoch)``
  re-derives the root for a newer epoch.
- ``open_store`` opens an embedded ``Store`` in this process or a ``Client`` of the host's ``kvtier serve``
  over its Unix socket (the backend writes and reads the shared arena's slots directly, so a TCP address is
  refused with ``ConfigError``).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from kvtier.config import StoreConfig, config_from_mapping
from kvtier.daemon import Client
from kvtier.errors import ConfigError, InvalidInputError, LayoutMismatchError
from kvtier.keys import KEY_BYTES, Namespace
from kvtier.layout import KVLayout
from kvtier.store import Store
from kvtier_connectors.model_identity import SGLANG_KV_OPTIONS, model_identity

StoreKind = Literal["embedded", "daemon"]
BlockStore = Store | Client
_KEY_DOMAIN = b"kvtier-sglang-page-v1"
_KNOWN_KEYS = {"store", "address", "model_id", "config_path", "config", "tenant_salt", "kv_cache_dtype"}
# SGLang's --kv-cache-dtype values (and torch's dtype names) -> the torch dtype of the stored bytes. On ROCm
# SGLang keeps every fp8 cache in its native e4m3fnuz format.
_FP8_FORMATS = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "auto": "float8_e4m3fn",
                "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
                "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz"}
_SCALED_FORMATS = ("mxfp8", "nvfp4", "fp4_mx_block16")
_PLAIN_FORMATS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "float32": "float32"}


@dataclass(frozen=True)
class StorageSettings:
    """The ``"kvtier"`` table of SGLang's storage extra config; defaults in docs/connectors/sglang.md."""

    store: StoreKind = "embedded"
    address: str = ""
    model_id: str = ""
    config_path: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    tenant_salt: str = ""
    kv_cache_dtype: str = ""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None,
                          default_model_id: str | Callable[[], str]) -> StorageSettings:
        """The settings of ``extra``; ``default_model_id`` (or its value, read only where the table sets no
        ``model_id``: it may hash weights) names the model otherwise."""
        extra = extra or {}
        if not extra.get("interface_v1"):
            raise ConfigError('kvtier serves SGLang\'s page-level batch interface: add "interface_v1": 1 to '
                              "--hicache-storage-backend-extra-config")
        table = extra.get("kvtier", {})
        if not isinstance(table, Mapping):
            raise ConfigError(f'"kvtier" in the storage extra config must be a table, got {table!r}')
        unknown = set(table) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(f"unknown kvtier key(s) in the storage extra config: {sorted(unknown)}; "
                              f"known: {sorted(_KNOWN_KEYS)}")
        settings = cls(
            store=table.get("store", "embedded"),
            address=str(table.get("address", "")),
            model_id=str(table.get("model_id") or (
                default_model_id() if callable(default_model_id) else default_model_id)),
            config_path=str(table.get("config_path", "")),
            config=table.get("config", {}),
            tenant_salt=str(table.get("tenant_salt", "")),
            kv_cache_dtype=str(table.get("kv_cache_dtype", "")),
        )
        if settings.store not in ("embedded", "daemon"):
            raise ConfigError(f"store must be 'embedded' or 'daemon', got {settings.store!r}")
        if settings.address and settings.store != "daemon":
            raise ConfigError("address names a daemon: give it with store='daemon'")
        if not isinstance(settings.config, Mapping):
            raise ConfigError("config must be a mapping shaped like kvtier's TOML file")
        if not settings.model_id:
            raise ConfigError("model_id is empty and SGLang names no model")
        known = {*_FP8_FORMATS, *_SCALED_FORMATS, *_PLAIN_FORMATS}
        if settings.kv_cache_dtype and settings.kv_cache_dtype not in known:
            raise ConfigError(f"kv_cache_dtype {settings.kv_cache_dtype!r} is not one of {sorted(known)}")
        return settings

    def store_config(self, rank_dir: str = "", pp_rank: int = 0) -> StoreConfig:
        """kvtier's configuration: the TOML file ``config_path`` (if any), then ``config`` over it.

        ``rank_dir`` (``rank_directory``) puts an embedded store's disk tier in that subdirectory of each path;
        ``{pp_rank}`` in a daemon address becomes ``pp_rank`` (one daemon per pipeline stage layout).
        """
        data: dict[str, Any] = {}
        if self.config_path:
            try:
                data = tomllib.loads(Path(self.config_path).read_text())
            except OSError as exc:
                raise ConfigError(f"cannot read config file {self.config_path}: {exc}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {self.config_path} is not valid TOML: {exc}") from exc
        for name, value in self.config.items():
            below = data.get(name)
            data[name] = {**below, **value} if isinstance(below, Mapping) and isinstance(value, Mapping) else value
        config = config_from_mapping(data)
        if self.store == "daemon":
            address = (self.address or config.daemon.connect or "unix").replace("{pp_rank}", str(pp_rank))
            if address.startswith("tcp://"):
                raise ConfigError("the SGLang backend writes the daemon's shared arena: connect over its Unix "
                                  f"socket ('unix' or 'unix:PATH'), not {address!r}")
            config = replace(config, daemon=replace(config.daemon, connect=address))
        elif rank_dir and config.disk.paths:
            paths = tuple(str(Path(path) / rank_dir) for path in config.disk.paths)
            config = replace(config, disk=replace(config.disk, paths=paths))
        return config


def rank_directory(storage_config: Any) -> str:
    """The disk subdirectory of one rank's embedded store: "" for a server of one rank, else its ranks."""
    c = storage_config
    dp_rank = getattr(c, "dp_rank", 0)
    if c.tp_size * c.pp_size * c.attn_cp_size == 1 and dp_rank == 0:
        return ""
    return (f"rank-tp{c.tp_rank}of{c.tp_size}-pp{c.pp_rank}of{c.pp_size}-cp{c.attn_cp_rank}of{c.attn_cp_size}"
            f"-dp{dp_rank}")


def sglang_model_id(model_name: str) -> str:
    """The default ``model_id``: ``model_identity`` of the model SGLang's scheduler process published (its path or
    hub id, revision and ``SGLANG_KV_OPTIONS``), else of ``model_name`` (the storage config's)."""
    model = _sglang_model()
    path = str(getattr(model, "model_path", "") or model_name)
    if model is None or not path:
        return model_identity(model_name) if model_name else ""
    return model_identity(path, getattr(model, "revision", None),
                          {name: getattr(model, name, None) for name in SGLANG_KV_OPTIONS})


def _sglang_model() -> Any | None:
    """SGLang's resolved model config as its scheduler process published it; ``None`` where it is not published."""
    try:
        from sglang.srt import runtime_context

        return runtime_context.get_model()
    except (ImportError, ValueError, AttributeError):
        return None


def _sglang_kv_cache_dtype() -> str:
    """SGLang's ``--kv-cache-dtype`` as its scheduler process published it; "" where it is not published."""
    try:
        from sglang.srt import runtime_context
    except ImportError:
        return ""
    # The resolved config bag first, then the operator's server arguments it was projected from.
    for getter in ("get_model", "get_server_args"):
        try:
            return str(getattr(runtime_context, getter)().kv_cache_dtype)
        except (ValueError, AttributeError):
            continue
    return ""


def kv_format(settings: StorageSettings, pool_dtype: str, *, rocm: bool | None = None) -> str:
    """What the pool's bytes are: its dtype, or for SGLang's ``uint8`` fp8 caches the fp8 format."""
    name = settings.kv_cache_dtype or (_sglang_kv_cache_dtype() if pool_dtype == "uint8" else "")
    if name in _SCALED_FORMATS:
        raise LayoutMismatchError(f"kvtier does not store block-scaled KV caches ({name}): their scales live "
                                  "outside the host pool's pages")
    if pool_dtype != "uint8":
        wanted = _PLAIN_FORMATS.get(name) or _FP8_FORMATS.get(name)
        if settings.kv_cache_dtype and name != "auto" and wanted != pool_dtype:
            raise ConfigError(f"kv_cache_dtype {name!r} contradicts the host pool, which holds {pool_dtype}")
        return pool_dtype
    if name not in _FP8_FORMATS:
        raise ConfigError("SGLang keeps fp8 KV caches as uint8 and did not say which fp8 format this one is: set "
                          '"kv_cache_dtype" (e.g. "fp8_e4m3" or "fp8_e5m2", as --kv-cache-dtype) in the kvtier table')
    on_rocm = torch.version.hip is not None if rocm is None else rocm
    fmt = _fp8_format(name, on_rocm)
    # Where SGLang publishes the format it runs, the setting must name the same bytes: else its pages would be
    # keyed as another format, and read as that one by a server that runs it.
    published = _sglang_kv_cache_dtype() if settings.kv_cache_dtype else ""
    if published in _FP8_FORMATS and published != "auto" and _fp8_format(published, on_rocm) != fmt:
        raise ConfigError(f"kv_cache_dtype {name!r} contradicts SGLang's --kv-cache-dtype {published!r}: the host "
                          "pool holds the latter's bytes")
    return fmt


def _fp8_format(name: str, on_rocm: bool) -> str:
    """The stored format of SGLang's fp8 ``--kv-cache-dtype`` ``name`` (on ROCm always e4m3fnuz)."""
    return "float8_e4m3fnuz" if on_rocm and not _FP8_FORMATS[name].endswith("fnuz") else _FP8_FORMATS[name]

@dataclass(frozen=True)
class Shard:
    """Which part of the model's KV one SGLang rank holds."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    # Decode context parallelism (MLA): each DCP rank's latent page holds its own share of the page's tokens.
    dcp_rank: int = 0
    dcp_size: int = 1

    @classmethod
    def of(cls, storage_config: Any, *, replicated: bool) -> Shard:
        """The shard of SGLang's ``HiCacheStorageConfig``; ``replicated`` (MLA) drops the tensor-parallel rank
        but keeps the DCP rank (SGLang releases before DCP have no ``dcp_size``: one shard)."""
        tp_rank, tp_size = (0, 1) if replicated else (storage_config.tp_rank, storage_config.tp_size)
        return cls(tp_rank, tp_size, storage_config.pp_rank, storage_config.pp_size, storage_config.attn_cp_rank,
                   storage_config.attn_cp_size, getattr(storage_config, "dcp_rank", 0),
                   getattr(storage_config, "dcp_size", 1))


class PageKeys:
    """kvtier keys of one shard's pages at one key epoch, from SGLang's chained page hashes."""

    def __init__(self, settings: StorageSettings, layout: KVLayout, shard: Shard, kv_format: str = "") -> None:
        salt = f"sglang:kv={kv_format or layout.dtype}"
        if settings.tenant_salt:
            salt += f":{settings.tenant_salt}"
        model = Namespace.for_layout(settings.model_id, layout, 0, 1, salt).encode()
        self.scope = "sglang/" + hashlib.sha256(_KEY_DOMAIN + model).hexdigest()[:32]
        shard_salt = f"{salt}:pp{shard.pp_rank}/{shard.pp_size}:cp{shard.cp_rank}/{shard.cp_size}"
        if shard.dcp_size > 1:  # absent otherwise: the keys of every store written before DCP stay the same
            shard_salt += f":dcp{shard.dcp_rank}/{shard.dcp_size}"
        namespace = Namespace.for_layout(settings.model_id, layout, shard.tp_rank, shard.tp_size, shard_salt)
        self._base = hashlib.sha256(_KEY_DOMAIN + namespace.encode()).digest()
        # (epoch, root) swapped as one object: the storage threads read it without a lock.
        self._state = (0, self._base)

    @property
    def epoch(self) -> int:
        return self._state[0]

    def at(self, epoch: int) -> None:
        """Derive keys under key epoch ``epoch`` from now on (epoch 0 is the root itself)."""
        root = self._base if epoch == 0 else hashlib.sha256(self._base + epoch.to_bytes(8, "big")).digest()
        self._state = (epoch, root)

    def keys(self, page_hashes: Sequence[str]) -> list[bytes]:
        """One key per page hash; ``InvalidInputError`` for a hash that is not a string."""
        root = self._state[1]
        keys = []
        for page_hash in page_hashes:
            if not isinstance(page_hash, str):
                raise InvalidInputError(f"SGLang page hashes must be strings, got {type(page_hash).__name__}")
            keys.append(hashlib.sha256(root + page_hash.encode()).digest()[:KEY_BYTES])
        return keys


def open_store(settings: StorageSettings, layout: KVLayout, rank_dir: str = "", pp_rank: int = 0) -> BlockStore:
    """An embedded ``Store`` for ``layout``, or a ``Client`` of the daemon (``store='daemon'``).

    A daemon that serves another layout refuses the client with ``LayoutMismatchError``.
    """
    config = settings.store_config(rank_dir, pp_rank)
    return Client(layout, config) if settings.store == "daemon" else Store(layout, config)
