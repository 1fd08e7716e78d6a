"""The disk tier (``kvtier.disk.DiskTier``) behind the lower-tier interface.

Promises: behaviour is the disk tier's own (see ``kvtier.disk.tier``); ``locate`` is one ``contains_many``
(the index is in memory); ``offer`` without ``wait`` refuses a block rather than wait for the drive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from types import MappingProxyType

import torch

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier
from kvtier.disk.admission import make_admission
from kvtier.disk.format import entry_bytes
from kvtier.layout import KVLayout
from kvtier.stats import TierStats
from kvtier.tiers.base import WriteMode


class DiskAdapter:
    """A ``LowerTier`` over a ``DiskTier`` (``self.tier``)."""

    name = "disk"
    local = True

    def __init__(self, config: DiskConfig, layout: KVLayout, slot_bytes: int) -> None:
        capacity_blocks = config.capacity_bytes * len(config.paths) // slot_bytes
        entry = entry_bytes(layout.block_bytes)
        # The tier's regions (scaled down on a small tier): what an exclusive disk frees once every block left.
        region_blocks = max(1, config.scaled_region_bytes(entry) // entry)
        self.tier = DiskTier(config, layout, make_admission(config.admission, max(1, capacity_blocks), region_blocks))
        self.write_mode: WriteMode = config.write_mode

    def contains(self, key: bytes) -> bool:
        return self.tier.contains(key)

    def locate(self, keys: Sequence[bytes]) -> list[bool]:
        return self.tier.contains_many(keys)

    def offer(self, key: bytes, payload: torch.Tensor, *, wait: bool = False,
              release: Callable[[], None] | None = None) -> bool:
        try:
            return self.tier.offer(key, payload, wait=wait)
        finally:
            if release is not None:
                release()  # the disk tier copies before it returns: nothing is borrowed

    def submit_read(self, key: bytes, dst: torch.Tensor) -> Future[bool]:
        return self.tier.submit_read(key, dst)

    def on_access(self, keys: Sequence[bytes], hit_flags: Sequence[bool]) -> None:
        self.tier.on_access(keys, hit_flags)

    def flush(self, deadline: float | None = None) -> None:
        self.tier.flush(deadline)

    def stats(self, hit_blocks: int) -> TierStats:
        disk = self.tier.stats()
        return TierStats(
            name="disk", capacity_blocks=disk.capacity_blocks, used_blocks=disk.used_blocks, hit_blocks=hit_blocks,
            evicted_blocks=disk.regions_evicted, bytes_read=disk.bytes_read, bytes_written=disk.bytes_written,
            detail=MappingProxyType({name: value for name, value in vars(disk).items()
                                     if isinstance(value, int | float | bool | str)}),
        )

    def close(self) -> None:
        self.tier.close()
