"""Eviction policies behind one atomic contract (see ``kvtier.policies.base``), chosen by name."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from kvtier.errors import ConfigError
from kvtier.policies.adaptive_s3fifo import AdaptiveS3FIFOPolicy
from kvtier.policies.arc import ARCPolicy
from kvtier.policies.base import EvictionPolicy
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy[Hashable]]] = {
    "lru": LRUPolicy,
    "s3fifo": S3FIFOPolicy,
    "arc": ARCPolicy,
    "s3fifo_adaptive": AdaptiveS3FIFOPolicy,
}


def make_policy(name: str, capacity: int) -> EvictionPolicy[Any]:
    """A new policy of the given name sized for ``capacity`` blocks; ``ConfigError`` on an unknown name."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return policy_class(capacity)


__all__ = ["ARCPolicy", "AdaptiveS3FIFOPolicy", "EvictionPolicy", "LRUPolicy", "POLICIES", "S3FIFOPolicy",
           "make_policy"]
