"""What the SGLang backend reads from ``--hicache-storage-backend-extra-config``, and the keys it derives.

Promises:
- ``StorageSettings.from_extra_config`` reads kvtier's settings from the ``"kvtier"`` table of SGLang's extra
  config (the keys documented in docs/connectors/sglang.md; ``ConfigError`` names an unknown key or a bad
  value) and insists on ``"interface_v1": 1``, the switch that makes SGLang call the page-level
  ``batch_get_v1`` / ``batch_set_v1``; without it SGLang would hand the backend copied flat pages instead.
- ``store_config`` is kvtier's configuration: defaults, then the TOML file ``config_path``, then the ``config``
  mapping over it, table by table.
- ``PageKeys`` turns SGLang's chained page hashes (hex strings, each naming its page and the whole prefix
  before it) into kvtier keys: ``key = H(namespace root || page hash)``. The namespace covers the model, the
  kvtier layout (geometry and dtype), the shard (tensor-parallel rank and size for MHA; none for MLA, whose
  latent is the same on every rank), the pipeline stage, the context-parallel rank and the tenant salt, so
  pages of another model, geometry or shard never match.
- ``open_store`` opens an embedded ``Store`` in this process or a ``Client`` of the host's ``kvtier serve``
  over its Unix socket (the backend writes and reads the shared arena's slots directly, so a TCP address is
  refused with ``ConfigError``).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from kvtier.config import StoreConfig, config_from_mapping
from kvtier.daemon import Client
from kvtier.errors import ConfigError, InvalidInputError
from kvtier.keys import KEY_BYTES, Namespace
from kvtier.layout import KVLayout
from kvtier.store import Store

StoreKind = Literal["embedded", "daemon"]
BlockStore = Store | Client
_KEY_DOMAIN = b"kvtier-sglang-page-v1"
_KNOWN_KEYS = {"store", "address", "model_id", "config_path", "config", "tenant_salt"}


@dataclass(frozen=True)
class StorageSettings:
    """The ``"kvtier"`` table of SGLang's storage extra config; defaults in docs/connectors/sglang.md."""

    store: StoreKind = "embedded"
    address: str = ""
    model_id: str = ""
    config_path: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    tenant_salt: str = ""

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, default_model_id: str) -> StorageSettings:
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
            model_id=str(table.get("model_id") or default_model_id),
            config_path=str(table.get("config_path", "")),
            config=table.get("config", {}),
            tenant_salt=str(table.get("tenant_salt", "")),
        )
        if settings.store not in ("embedded", "daemon"):
            raise ConfigError(f"store must be 'embedded' or 'daemon', got {settings.store!r}")
        if settings.address and settings.store != "daemon":
            raise ConfigError("address names a daemon: give it with store='daemon'")
        if not isinstance(settings.config, Mapping):
            raise ConfigError("config must be a mapping shaped like kvtier's TOML file")
        if not settings.model_id:
            raise ConfigError("model_id is empty and SGLang names no model")
        return settings

    def store_config(self) -> StoreConfig:
        """kvtier's configuration: the TOML file ``config_path`` (if any), then ``config`` over it."""
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
            address = self.address or config.daemon.connect or "unix"
            if address.startswith("tcp://"):
                raise ConfigError("the SGLang backend writes the daemon's shared arena: connect over its Unix "
                                  f"socket ('unix' or 'unix:PATH'), not {address!r}")
            config = replace(config, daemon=replace(config.daemon, connect=address))
        return config


@dataclass(frozen=True)
class Shard:
    """Which part of the model's KV one SGLang rank holds."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1

    @classmethod
    def of(cls, storage_config: Any, *, replicated: bool) -> Shard:
        """The shard of SGLang's ``HiCacheStorageConfig``; ``replicated`` (MLA) drops the tensor-parallel rank."""
        tp_rank, tp_size = (0, 1) if replicated else (storage_config.tp_rank, storage_config.tp_size)
        return cls(tp_rank, tp_size, storage_config.pp_rank, storage_config.pp_size, storage_config.attn_cp_rank,
                   storage_config.attn_cp_size)


class PageKeys:
    """kvtier keys of one shard's pages, from SGLang's chained page hashes."""

    def __init__(self, settings: StorageSettings, layout: KVLayout, shard: Shard) -> None:
        salt = f"sglang:pp{shard.pp_rank}/{shard.pp_size}:cp{shard.cp_rank}/{shard.cp_size}"
        if settings.tenant_salt:
            salt += f":{settings.tenant_salt}"
        namespace = Namespace.for_layout(settings.model_id, layout, shard.tp_rank, shard.tp_size, salt)
        self._root = hashlib.sha256(_KEY_DOMAIN + namespace.encode()).digest()

    def keys(self, page_hashes: Sequence[str]) -> list[bytes]:
        """One key per page hash; ``InvalidInputError`` for a hash that is not a string."""
        keys = []
        for page_hash in page_hashes:
            if not isinstance(page_hash, str):
                raise InvalidInputError(f"SGLang page hashes must be strings, got {type(page_hash).__name__}")
            keys.append(hashlib.sha256(self._root + page_hash.encode()).digest()[:KEY_BYTES])
        return keys


def open_store(settings: StorageSettings, layout: KVLayout) -> BlockStore:
    """An embedded ``Store`` for ``layout``, or a ``Client`` of the daemon (``store='daemon'``).

    A daemon that serves another layout refuses the client with ``LayoutMismatchError``.
    """
    config = settings.store_config()
    return Client(layout, config) if settings.store == "daemon" else Store(layout, config)
