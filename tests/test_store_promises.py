"""Promises of the store that only a deliberate break showed unheld: each test here failed on such a break.

- The disk copy of a block stays valid after its promotion to host (a restart finds it).
- ``lookup`` starts the disk reads of its disk hits at once: they reach host with no further call.
- A transfer error in a put leaves nothing readable under its keys; one in a get reports the block
  failed and leaves the stored block intact and unpinned.
- The transformers connector's save is best effort: a block that gets no host slot is skipped, never an
  error, and the prefill's logits are the model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support import random_blocks

from kvtier import DiskConfig, HostConfig, KVLayout, Store, StoreConfig, Tier, TransferConfig


def disk_store(layout: KVLayout, path: Path, num_slots: int = 4) -> Store:
    disk = DiskConfig(paths=(str(path),), capacity_bytes="4MiB", region_bytes="256KiB",  # type: ignore[arg-type]
                      admission="admit_all")
    return Store(layout, StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy="lru"), disk=disk,
                                     transfer=TransferConfig(backend="cpu")))


def keys_for(store: Store, count: int) -> list[bytes]:
    return store.hasher("promises").keys(list(range(count * store.layout.block_tokens)))


def read(store: Store, keys: list[bytes]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    out = [torch.full(store.layout.block_shape, float("nan")) for _ in keys]
    return out, store.get(keys, out).wait(30).failed


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def put_flushed(store: Store, layout: KVLayout) -> tuple[list[bytes], list[torch.Tensor]]:
    """The keys and blocks of 8 blocks put into ``store`` two at a time, then flushed to its disk tier."""
    blocks = random_blocks(layout, 8)
    keys = keys_for(store, 8)
    for start in range(0, 8, 2):
        assert store.put(keys[start : start + 2], blocks[start : start + 2]).wait().ok
    store.flush()
    return keys, blocks


def on_disk(layout: KVLayout, path: Path) -> tuple[list[bytes], list[torch.Tensor]]:
    """``put_flushed`` into a disk store at ``path``, closed: a reopen finds the blocks on disk."""
    with disk_store(layout, path) as store:
        return put_flushed(store, layout)


def test_the_disk_copy_stays_valid_after_promotion(layout: KVLayout, tmp_path: Path) -> None:
    with disk_store(layout, tmp_path) as store:
        keys, blocks = put_flushed(store, layout)
        assert store.contains(keys[0]) is Tier.DISK
        out, failed = read(store, keys[:1])  # promoted into host
        assert failed == () and torch.equal(out[0], blocks[0])
        assert store.contains(keys[0]) is Tier.HOST
    with disk_store(layout, tmp_path) as store:  # the host copy is gone; the disk copy must remain
        assert store.contains(keys[0]) is Tier.DISK
        out, failed = read(store, keys[:1])
        assert failed == () and torch.equal(out[0], blocks[0])


def test_lookup_starts_disk_reads_at_once(layout: KVLayout, tmp_path: Path) -> None:
    keys, blocks = on_disk(layout, tmp_path)
    with disk_store(layout, tmp_path) as store:
        found = store.lookup(keys[:3])
        assert found.num_blocks == 3 and set(found.tiers) == {Tier.DISK}
        # No get, no acquire: the reads started by the lookup bring the blocks into host by themselves.
        assert wait_until(lambda: all(store.contains(key) is Tier.HOST for key in keys[:3]))
        assert store.contains(keys[3]) is Tier.DISK  # not looked up, not read
        lease = store.acquire(keys[:3])
        assert all(torch.equal(store.slot_view(slot).view(layout.block_shape), block)
                   for slot, block in zip(lease.slots, blocks[:3], strict=True))
        store.release(lease)


def test_lookup_acquire_reads_disk_blocks_as_lookup_and_acquire_do(layout: KVLayout, tmp_path: Path) -> None:
    """A run that continues on disk (or a promotion in flight) goes through the two calls: prefetched, waited
    for, and leased whole, with the tiers the lookup found."""
    keys, blocks = on_disk(layout, tmp_path)
    with disk_store(layout, tmp_path) as store:
        assert read(store, keys[2:4])[1] == ()  # host: blocks 2 and 3; disk only: 0 and 1
        found, lease = store.lookup_acquire(keys[:4])
        assert found.tiers == (Tier.DISK, Tier.DISK, Tier.HOST, Tier.HOST) and len(lease.slots) == 4
        assert all(torch.equal(store.slot_view(slot).view(layout.block_shape), block)
                   for slot, block in zip(lease.slots, blocks[:4], strict=True))
        store.release(lease)
        assert store.stats().lookups == 1


class FailingTransfers:
    """The store's transfer engine, whose jobs in ``direction`` report an error after copying."""

    def __init__(self, engine: Any, direction: Any) -> None:
        self.engine = engine
        self.direction = direction

    def _done(self, direction: Any, on_done: Callable[[BaseException | None], None]) -> Any:
        if direction != self.direction:
            return on_done
        return lambda error: on_done(RuntimeError("injected copy error"))

    def submit(self, pairs: Any, direction: Any, on_done: Callable[[BaseException | None], None]) -> Any:
        return self.engine.submit(pairs, direction, self._done(direction, on_done))

    def submit_blocks(self, rows: Any, slots: Any, blocks: Any, direction: Any,
                      on_done: Callable[[BaseException | None], None]) -> Any:
        return self.engine.submit_blocks(rows, slots, blocks, direction, self._done(direction, on_done))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def test_a_put_transfer_error_leaves_nothing_readable(make_store: Any, layout: KVLayout,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.transfer import Direction

    store = make_store(num_slots=4)
    keys = store.hasher("promises").keys(list(range(3 * layout.block_tokens)))
    blocks = random_blocks(layout, 3)
    monkeypatch.setattr(store, "transfer", FailingTransfers(store.transfer, Direction.STORE))
    result = store.put(keys, blocks).wait(10)
    assert sorted(result.failed) == [0, 1, 2]
    assert store.lookup(keys).num_blocks == 0 and all(store.contains(key) is None for key in keys)
    assert read(store, keys)[1] == (0, 1, 2) and store.acquire(keys).keys == ()
    assert store.stats().tiers["host"].used_blocks == 0  # the slots are free again
    monkeypatch.undo()
    assert store.put(keys, blocks).wait(10).ok  # and the keys can be stored afresh
    out, failed = read(store, keys)
    assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks, strict=True))


def test_a_get_transfer_error_fails_the_block_and_keeps_it_intact(make_store: Any, layout: KVLayout,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.transfer import Direction

    store = make_store(num_slots=4)
    keys = store.hasher("promises").keys(list(range(2 * layout.block_tokens)))
    blocks = random_blocks(layout, 2)
    assert store.put(keys, blocks).wait(10).ok
    monkeypatch.setattr(store, "transfer", FailingTransfers(store.transfer, Direction.LOAD))
    assert sorted(read(store, keys)[1]) == [0, 1]
    assert store.stats().tiers["host"].detail["pinned_blocks"] == 0
    monkeypatch.undo()
    out, failed = read(store, keys)
    assert failed == () and all(torch.equal(o, b) for o, b in zip(out, blocks, strict=True))


def test_the_transformers_save_is_best_effort(tmp_path: Path) -> None:
    from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model

    model = random_model("llama")
    layout = kv_layout(model, 8)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(2))
    with Store(layout, StoreConfig(host=HostConfig(capacity_bytes=2 * max(4096, layout.block_bytes)))) as store:
        others = store.hasher("someone-else").keys(list(range(2 * layout.block_tokens)))
        assert store.put(others, random_blocks(layout, 2)).wait(10).ok
        lease = store.acquire(others)  # every host slot pinned: nothing can be saved
        connector = TransformersConnector(model, store)
        result = connector.prefill(ids)
        assert result.saved_blocks == 0 and result.restored_tokens == 0
        with torch.no_grad():
            assert torch.equal(result.logits[:, -1], model(ids).logits[:, -1])
        store.release(lease)
        # Slots free again: the prefix that fits the 2-slot host is saved, the rest skipped without an error.
        assert connector.prefill(ids).saved_blocks == 2
