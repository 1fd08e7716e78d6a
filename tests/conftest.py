"""Shared fixtures: a small layout, a store factory, the ``gpu`` marker's skip, and a data directory of the
session's own (the daemon's default disk tier never lands in the user's)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch
from support import StoreFactory

from kvtier import HostConfig, KVLayout, Store, StoreConfig, TransferConfig


def pytest_configure(config: pytest.Config) -> None:
    # XDG_DATA_HOME reaches the daemons the tests start too: a default disk tier is the session's, not one
    # left in ~/.local/share by an earlier run (with other free space, so other regions).
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="kvtier-test-data-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["XDG_DATA_HOME"], ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def layout() -> KVLayout:
    # 2 layers x K/V x 2 heads x 4 tokens x 8 dims x float32 = 1 KiB a block.
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)


@pytest.fixture
def make_store(layout: KVLayout) -> Iterator[StoreFactory]:
    stores: list[Store] = []

    def make(num_slots: int = 8, policy: str = "lru", **overrides: object) -> Store:
        config = StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy=policy),
                             transfer=TransferConfig(backend="cpu"), **overrides)  # type: ignore[arg-type]
        store = Store(layout, config)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
