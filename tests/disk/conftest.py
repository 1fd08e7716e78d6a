"""Fixtures of the disk tier tests: ``kit`` (a small layout with 16 KiB blocks, deterministic blocks, a
stand-in admission) and ``disk_config`` (4 regions of 256 KiB in a temporary directory)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier, aligned_tensor
from kvtier.layout import KVLayout


class StandInAdmission:
    """Admits what ``decide`` says (everything by default), runs the disk ``exclusive`` of host RAM when told
    (not by default), and records every call."""

    name = "stand_in"

    def __init__(self, decide: Callable[[Hashable], bool] = lambda key: True, exclusive: bool = False) -> None:
        self.decide = decide
        self.exclusive = exclusive
        self.accesses: list[tuple[Hashable, bool]] = []
        self.offered: list[Hashable] = []

    def on_access(self, key: Hashable, hit: bool) -> None:
        self.accesses.append((key, hit))

    def admit(self, key: Hashable) -> bool:
        self.offered.append(key)
        return self.decide(key)


class DiskKit:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=16)
    block = layout.block_bytes  # 16 KiB; one entry takes 20 KiB with its header page
    region = 256 * 1024
    per_region = 12
    admission = StandInAdmission

    @staticmethod
    def key(i: int) -> bytes:
        return i.to_bytes(16, "little")

    def payload(self, i: int) -> torch.Tensor:
        """Deterministic random bytes of one block, different for every ``i``."""
        return torch.randint(0, 256, (self.block,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))

    def read(self, tier: DiskTier, i: int) -> torch.Tensor | None:
        dst = aligned_tensor(self.block)
        return dst.clone() if tier.read_into(self.key(i), dst) else None

    def fill(self, tier: DiskTier, ids: range) -> None:
        for i in ids:
            assert tier.offer(self.key(i), self.payload(i)), f"block {i} not admitted"

    def assert_holds(self, tier: DiskTier, ids: range) -> None:
        for i in ids:
            got = self.read(tier, i)
            assert got is not None and torch.equal(got, self.payload(i)), f"block {i}"


@pytest.fixture
def kit() -> DiskKit:
    return DiskKit()


@pytest.fixture
def disk_config(tmp_path: Path) -> Callable[..., DiskConfig]:
    """``disk_config(**overrides)``: 4 regions of 256 KiB in ``tmp_path/disk`` (``min_regions`` 1: the regions
    as given, not scaled down)."""

    def make(**overrides: Any) -> DiskConfig:
        fields: dict[str, Any] = {"paths": (str(tmp_path / "disk"),), "capacity_bytes": 4 * DiskKit.region,
                                  "region_bytes": DiskKit.region, "min_regions": 1, "io_threads": 2, **overrides}
        return DiskConfig(**fields)

    return make
