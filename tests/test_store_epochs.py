"""Key epochs of the embedded store: per scope, shared in the process, persisted with the disk tier's index."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_store_disk import disk_store

from kvtier import KVLayout, Store, StoreConfig
from kvtier.config import HostConfig, TransferConfig
from kvtier.errors import ClosedError, InvalidInputError


def memory_store(layout: KVLayout) -> Store:
    return Store(layout, StoreConfig(host=HostConfig(capacity_bytes=16 * 4096), transfer=TransferConfig(backend="cpu")))


def test_epochs_start_at_zero_and_advance_per_scope(layout: KVLayout) -> None:
    with memory_store(layout) as store:
        assert store.epoch("model-a") == 0
        first = store.advance_epoch("model-a")
        second = store.advance_epoch("model-a")
        assert 0 < first < second
        assert store.epoch("model-a") == second and store.epoch("model-b") == 0
        keys = store.hasher("m").keys(list(range(layout.block_tokens)))
        assert store.lookup(keys, scope="model-a").epoch == second
        assert store.lookup(keys).epoch is None


def test_epochs_survive_a_restart_with_a_disk_tier(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path) as store:
        store.advance_epoch("scope/x")
        last = store.advance_epoch("scope/x")
        other = store.advance_epoch("other")
    with disk_store(layout, tmp_path) as store:
        assert store.epoch("scope/x") == last and store.epoch("other") == other
        assert store.advance_epoch("scope/x") > last  # never a value handed out before


def test_concurrent_advances_each_get_their_own_epoch(layout: KVLayout) -> None:
    with memory_store(layout) as store:
        got: list[int] = []
        lock = threading.Lock()

        def advance() -> None:
            for _ in range(50):
                epoch = store.advance_epoch("s")
                with lock:
                    got.append(epoch)

        threads = [threading.Thread(target=advance) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(set(got)) == 200


@pytest.mark.parametrize("scope", ["", "x" * 257, 7, None, b"bytes"])
def test_a_malformed_scope_is_refused(layout: KVLayout, scope: object) -> None:
    with memory_store(layout) as store:
        for call in (store.epoch, store.advance_epoch):
            with pytest.raises(InvalidInputError, match="scope"):
                call(scope)  # type: ignore[arg-type]
        keys = store.hasher("m").keys(list(range(layout.block_tokens)))
        if scope is not None:
            with pytest.raises(InvalidInputError, match="scope"):
                store.lookup(keys, scope=scope)  # type: ignore[arg-type]


def test_a_closed_store_refuses_epoch_calls(layout: KVLayout) -> None:
    store = memory_store(layout)
    store.close()
    with pytest.raises(ClosedError):
        store.advance_epoch("s")
