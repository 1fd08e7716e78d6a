"""Blocks for the remote tier's tests: a key per (space, index), seeded random payloads, a read with a deadline."""

from __future__ import annotations

import hashlib

import torch

from kvtier.tiers.remote import RemoteTier


def block_key(i: int, space: str) -> bytes:
    return hashlib.blake2b(f"{space}-{i}".encode(), digest_size=16).digest()


def random_block(i: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def read_block(tier: RemoteTier, key: bytes, timeout: float) -> torch.Tensor | None:
    """The block read back from ``tier``, or ``None`` for a miss (the read must resolve within ``timeout``)."""
    dst = torch.zeros(tier.block_bytes, dtype=torch.uint8)
    return dst if tier.submit_read(key, dst).result(timeout) else None
