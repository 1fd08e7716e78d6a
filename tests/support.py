"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier import KVLayout, Store

StoreFactory = Callable[..., Store]


def random_blocks(layout: KVLayout, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.block_shape, generator=generator) for _ in range(count)]
