"""Immutable snapshots of a store's counters, for callers, the CLI and the daemon's metrics.

Promises: a snapshot never changes after it is returned; counters only grow over a store's life; the
names carry their units (``_blocks``, ``_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TierStats:
    """One tier: how full it is, what it served and what it dropped."""

    name: str
    capacity_blocks: int
    used_blocks: int
    hit_blocks: int
    evicted_blocks: int
    bytes_read: int
    bytes_written: int
    detail: Mapping[str, int | float | bool | str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class StoreStats:
    """The whole store. A *hit* is a block a lookup found in some tier; a *miss* one it did not."""

    lookups: int
    hit_blocks: int
    miss_blocks: int
    put_blocks: int
    put_deduplicated_blocks: int
    put_failed_blocks: int
    get_blocks: int
    get_failed_blocks: int
    bytes_put: int
    bytes_got: int
    tiers: Mapping[str, TierStats]
    # Committed blocks not written through: no room in the write-through queue before
    # ``host.write_through_wait_ms``, or the store closed first (they stay in the host pool, demoted on
    # eviction); and blocks whose write-through offer raised (logged). Defaults keep older daemons' replies.
    write_through_skipped_blocks: int = 0
    write_through_failed_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and numbers, ready for JSON."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tiers"}
        data["tiers"] = {
            name: {**{f.name: getattr(tier, f.name) for f in fields(tier) if f.name != "detail"},
                   "detail": dict(tier.detail)}
            for name, tier in self.tiers.items()
        }
        return data
