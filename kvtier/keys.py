"""Content addresses of KV blocks: chained hashes over a namespace and each block's token ids.

``key_0 = H(namespace)``, ``key_i = H(key_{i-1} || tokens of block i)``: a key names a block *and* its
whole prefix, so a lookup is the longest leading run of keys present.

Promises:
- Keys are 16 bytes (128 bits), deterministic across processes, interpreters and machines: they never
  depend on Python's ``hash()`` or ``PYTHONHASHSEED``. Token ids are hashed as little-endian uint32.
- The namespace covers the model id, the layout fingerprint, the shard (tp rank and size) and an optional
  tenant salt, so blocks of another model, layout or shard never share a key.
- The default hash is cryptographic (SHA-256 truncated to 128 bits); ``blake3`` is also cryptographic;
  ``xxh3_128`` is faster and only for trusted single-tenant use (it is not collision resistant against an
  adversary who chooses prompts).
- Only whole blocks get keys: a trailing partial block is never hashed.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import blake3
import numpy as np
import torch
import xxhash

from kvtier.errors import ConfigError, InvalidInputError
from kvtier.layout import KVLayout

KEY_BYTES = 16
HashAlgo = Literal["sha256", "blake3", "xxh3_128"]
HASH_ALGOS: tuple[HashAlgo, ...] = ("sha256", "blake3", "xxh3_128")
_MAX_TOKEN_ID = 2**32 - 1


def _chain(previous: bytes, chunks: list[bytes], algo: str) -> list[bytes]:
    """``key_i = H(key_{i-1} || chunk_i)`` for every chunk, starting from ``previous``.

    One loop per algorithm, with the hash bound to a local: a lambda per block would double the cost.
    """
    keys: list[bytes] = []
    append = keys.append
    if algo == "sha256":
        sha256 = hashlib.sha256
        for chunk in chunks:
            previous = sha256(previous + chunk).digest()[:16]
            append(previous)
    elif algo == "blake3":
        b3 = blake3.blake3
        for chunk in chunks:
            previous = b3(previous + chunk).digest(16)
            append(previous)
    elif algo == "xxh3_128":
        xxh3 = xxhash.xxh3_128_digest
        for chunk in chunks:
            previous = xxh3(previous + chunk)
            append(previous)
    else:
        raise ConfigError(f"unknown hash algorithm {algo!r}; choose one of {HASH_ALGOS}")
    return keys


@dataclass(frozen=True)
class Namespace:
    """What makes blocks of equal tokens different: model, layout, shard and tenant."""

    model_id: str
    layout_fingerprint: str
    tp_rank: int = 0
    tp_size: int = 1
    tenant_salt: str = ""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("Namespace.model_id must not be empty")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"tp_rank {self.tp_rank} is not in [0, tp_size={self.tp_size})")

    @classmethod
    def for_layout(cls, model_id: str, layout: KVLayout, tp_rank: int = 0, tp_size: int = 1,
                   tenant_salt: str = "") -> Namespace:
        return cls(model_id, layout.fingerprint, tp_rank, tp_size, tenant_salt)

    def encode(self) -> bytes:
        """Canonical bytes of the namespace (length-prefixed fields, so no two namespaces collide)."""
        parts = [
            b"kvtier-ns-v1",
            self.model_id.encode(),
            self.layout_fingerprint.encode(),
            str(self.tp_rank).encode(),
            str(self.tp_size).encode(),
            self.tenant_salt.encode(),
        ]
        return b"".join(len(part).to_bytes(4, "little") + part for part in parts)


def _tokens_as_bytes(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """Token ids as little-endian uint32 bytes; ``InvalidInputError`` for anything else."""
    if isinstance(token_ids, list | tuple):
        # array.array converts a list of ints about twice as fast as numpy does.
        try:
            packed = array.array("I", token_ids)
        except (OverflowError, TypeError) as exc:
            raise InvalidInputError(f"token ids must be ints in [0, 2**32): {exc}") from None
        if sys.byteorder == "big":
            packed.byteswap()
        return packed.tobytes()
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    values = np.asarray(token_ids)
    if values.ndim != 1:
        raise InvalidInputError(f"token ids must be one-dimensional, got shape {values.shape}")
    if values.size == 0:
        return b""
    if not np.issubdtype(values.dtype, np.integer):
        raise InvalidInputError(f"token ids must be integers, got dtype {values.dtype}")
    if int(values.min()) < 0 or int(values.max()) > _MAX_TOKEN_ID:
        raise InvalidInputError("token ids must lie in [0, 2**32)")
    return values.astype("<u4", copy=False).tobytes()


class BlockHasher:
    """Derives the chained keys of a token sequence for one namespace and block size."""

    def __init__(self, namespace: Namespace, block_tokens: int, algo: HashAlgo = "sha256") -> None:
        if block_tokens <= 0:
            raise ConfigError(f"block_tokens must be positive, got {block_tokens}")
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.algo = algo
        self.root_key = _chain(b"", [namespace.encode()], algo)[0]

    def keys(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[bytes]:
        """Keys of every whole block of ``token_ids``; the partial tail gets none."""
        return self.extend(None, token_ids)

    def extend(self, parent_key: bytes | None, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[bytes]:
        """Keys of the whole blocks of ``token_ids`` chained after ``parent_key`` (the root when ``None``)."""
        if parent_key is not None:
            check_key(parent_key)
        data = _tokens_as_bytes(token_ids)
        stride = self.block_tokens * 4
        chunks = [data[start : start + stride] for start in range(0, len(data) // stride * stride, stride)]
        return _chain(self.root_key if parent_key is None else parent_key, chunks, self.algo)


def check_key(key: object) -> bytes:
    """Return ``key`` if it is a well-formed block key, else raise ``InvalidInputError``."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        shown = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise InvalidInputError(f"a block key must be {KEY_BYTES} bytes, got {shown}")
    return key


def check_keys(keys: Sequence[bytes]) -> list[bytes]:
    """Validate every key of ``keys``; ``InvalidInputError`` on the first bad one or a duplicate."""
    checked = list(keys)
    # Types and lengths through C-level maps (a lookup of a long prompt checks thousands of keys); any odd
    # key goes through ``check_key`` for its precise error.
    if set(map(type, checked)) - {bytes} or set(map(len, checked)) - {KEY_BYTES}:
        checked = [check_key(key) for key in checked]
    if len(set(checked)) != len(checked):
        raise InvalidInputError("the same key appears twice in one call")
    return checked
