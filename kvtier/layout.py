"""The shape of one model shard's KV, and the bytes of one block of it.

Promises:
- ``KVLayout`` is immutable and validated at construction (``ConfigError`` on a bad field).
- ``block_bytes`` is the exact byte size of one block: every layer's K and V (or its single latent) for
  ``block_tokens`` tokens of one shard, stored contiguously in ``block_shape`` order.
- ``fingerprint`` is a stable 16-hex-digit digest of every field that changes the bytes of a block; it is
  the same in every process and on every machine, and it is part of every block key's namespace.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import torch

from kvtier.errors import ConfigError, InvalidInputError

KVKind = Literal["kv", "latent"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
    "int8": torch.int8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The layout name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    for name, candidate in _DTYPES.items():
        if candidate == dtype:
            return name
    raise ConfigError(f"unsupported KV dtype {dtype}; supported: {sorted(_DTYPES)}")


@dataclass(frozen=True)
class KVLayout:
    """KV of one model shard: ``num_layers`` layers of K and V (or one latent) per token."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int
    kind: KVKind = "kv"

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"KVLayout.{field} must be a positive int, got {value!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.kind not in ("kv", "latent"):
            raise ConfigError(f"KVLayout.kind must be 'kv' or 'latent', got {self.kind!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def num_planes(self) -> int:
        """2 for separate K and V, 1 for a single latent (MLA)."""
        return 2 if self.kind == "kv" else 1

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(num_layers, num_planes, num_kv_heads, block_tokens, head_dim)``."""
        return (self.num_layers, self.num_planes, self.num_kv_heads, self.block_tokens, self.head_dim)

    @property
    def block_numel(self) -> int:
        return self.num_layers * self.num_planes * self.num_kv_heads * self.block_tokens * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_numel * self.torch_dtype.itemsize

    @property
    def token_bytes(self) -> int:
        return self.block_bytes // self.block_tokens

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(
            {
                "v": 1,
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "dtype": self.dtype,
                "block_tokens": self.block_tokens,
                "kind": self.kind,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, int | str]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_tokens": self.block_tokens,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> KVLayout:
        """Build a layout from ``to_dict`` output; ``ConfigError`` on a missing or unknown field."""
        expected = {"num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens", "kind"}
        if not isinstance(fields, dict) or set(fields) - expected or not {"num_layers", "dtype"} <= set(fields):
            raise ConfigError(f"a layout needs the fields {sorted(expected)}, got {fields!r}")
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except TypeError as exc:  # a required field missing
            raise ConfigError(f"a layout needs the fields {sorted(expected)}, got {fields!r}: {exc}") from exc

    def check_block(self, block: torch.Tensor, what: str = "block") -> None:
        """Raise ``InvalidInputError`` unless ``block`` holds exactly one block of this layout.

        Accepted: a contiguous tensor of this layout's dtype shaped ``block_shape`` or flat
        ``(block_numel,)``, on any device.
        """
        if not isinstance(block, torch.Tensor):
            raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(block).__name__}")
        if block.dtype != self.torch_dtype:
            raise InvalidInputError(f"{what} has dtype {block.dtype}, the layout needs {self.torch_dtype}")
        if tuple(block.shape) not in (self.block_shape, (self.block_numel,)):
            raise InvalidInputError(
                f"{what} has shape {tuple(block.shape)}, the layout needs {self.block_shape} "
                f"or ({self.block_numel},)"
            )
        if not block.is_contiguous():
            raise InvalidInputError(f"{what} must be contiguous")
