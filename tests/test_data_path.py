"""The data path's structure where no GPU runs it: copies and launches do not grow with the block count.

A recording transfer engine counts the store's submissions; counting ``PagedKV``'s copy calls (one kernel
launch each on CUDA) pins the transformers connector's restore and save. No step allocates pinned memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from support import random_blocks

from kvtier import HostConfig, KVLayout, Store, StoreConfig
from kvtier.arena import HostArena
from kvtier.native import PagedKV
from kvtier.transfer import CopyPair, CpuTransferEngine, Direction, DoneCallback, Transfer, TransferEngine


class RecordingEngine(TransferEngine):
    """The CPU engine, counting each kind of submission."""

    name = "recording"

    def __init__(self) -> None:
        self.inner = CpuTransferEngine(2)
        self.submits: list[int] = []
        self.block_submits: list[int] = []

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        self.submits.append(len(pairs))
        return self.inner.submit(pairs, direction, on_done)

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer:
        self.block_submits.append(len(blocks))
        return self.inner.submit_blocks(rows, slots, blocks, direction, on_done, after=after)

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def no_pinned_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any pinned allocation made through ``pin_memory()`` or ``torch.empty(..., pin_memory=True)``."""
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        assert not kwargs.get("pin_memory"), "a pinned allocation on the data path"
        return real_empty(*args, **kwargs)

    def pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("pin_memory() on the data path")

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    yield


@pytest.mark.parametrize("num_blocks", [1, 8, 48])
def test_store_put_and_get_are_one_submission_each(layout: KVLayout, num_blocks: int,
                                                   no_pinned_allocations: None) -> None:
    engine = RecordingEngine()
    config = StoreConfig(host=HostConfig(capacity_bytes=64 * 4096))
    with Store(layout, config, transfer=engine) as store:
        keys = store.hasher("structure").keys(list(range(num_blocks * layout.block_tokens)))
        blocks = random_blocks(layout, num_blocks)
        assert store.put(keys, blocks).wait(30).ok
        outputs = [torch.zeros_like(block) for block in blocks]
        assert store.get(keys, outputs).wait(30).ok
        assert engine.block_submits == [num_blocks, num_blocks] and engine.submits == []
        assert all(torch.equal(out, block) for out, block in zip(outputs, blocks, strict=True))


class _CopyCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("gather", "scatter", "gather_to_slots", "scatter_from_slots"):
            monkeypatch.setattr(PagedKV, name, self._wrap(name, getattr(PagedKV, name)))

    def _wrap(self, name: str, method: Any) -> Any:
        def counted(paged: PagedKV, *args: Any, **kwargs: Any) -> None:
            self.calls.append(name)
            method(paged, *args, **kwargs)

        return counted


@pytest.mark.parametrize("num_blocks", [2, 9])
def test_transformers_restore_and_save_are_one_copy_call_each(num_blocks: int, monkeypatch: pytest.MonkeyPatch,
                                                              no_pinned_allocations: None) -> None:
    pytest.importorskip("transformers")
    from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model

    model = random_model("llama")
    layout = kv_layout(model, 8)
    prompt = torch.randint(0, 512, (1, num_blocks * 8 + 16), generator=torch.Generator().manual_seed(3))
    with Store(layout, StoreConfig(host=HostConfig(capacity_bytes=64 * max(4096, layout.block_bytes)))) as store:
        counter = _CopyCounter(monkeypatch)
        connector = TransformersConnector(model, store)
        first = connector.prefill(prompt)
        assert first.saved_blocks == num_blocks + 2 and counter.calls == ["gather_to_slots"]
        counter.calls.clear()
        second = connector.prefill(prompt)
        assert second.restored_tokens == num_blocks * 8
        # One call for every layer and block, on the CPU as on CUDA (one launch there), straight into the cache.
        assert counter.calls == ["scatter_from_slots"]
        assert torch.equal(second.logits[:, -1], first.logits[:, -1])


def test_arena_prefault_keeps_bytes_written_meanwhile() -> None:
    arena = HostArena(8, 4096)
    try:
        arena.slot(0).fill_(7)
        arena.prepare(prefault=True)
        arena.slot(7).fill_(9)
        # A kernel before 5.14 has no MADV_POPULATE_WRITE: nothing is prefaulted, nothing else changes.
        assert arena.wait_prepared(30) or arena.prefaulted_bytes == 0
        assert bool((arena.slot(0) == 7).all()) and bool((arena.slot(7) == 9).all())
        assert torch.count_nonzero(arena.rows()[1:7]) == 0
        assert arena.pinned_bytes == 0
    finally:
        arena.close()


@pytest.mark.gpu
@pytest.mark.parametrize("pin", [True, False], ids=["registered", "pageable"])
def test_transformers_on_cuda_restores_the_saved_bits(pin: bool) -> None:
    """On a GPU: the restored cache holds exactly the K/V the first prefill saved (kernel or fallback path)."""
    from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model

    model = random_model("llama", dtype=torch.bfloat16).to("cuda")
    layout = kv_layout(model, 8)
    prompt = torch.randint(0, 512, (1, 8 * 12 + 16), generator=torch.Generator().manual_seed(4)).to("cuda")
    config = StoreConfig(host=HostConfig(capacity_bytes=64 * max(4096, layout.block_bytes), pin=pin))
    with Store(layout, config) as store:
        store.arena.wait_prepared()
        connector = TransformersConnector(model, store)
        first = connector.prefill(prompt)
        connector.wait_saves()
        second = connector.prefill(prompt)
        connector.wait_saves()
        assert second.restored_tokens == 8 * 12
        # Timed to the copy's completion with CUDA events on the forward's stream.
        assert second.restore_span is not None and second.restore_device_s() > 0
        for saved, restored in zip(first.cache.layers, second.cache.layers, strict=True):
            assert torch.equal(restored.keys[:, :, : 8 * 12], saved.keys[:, :, : 8 * 12])
            assert torch.equal(restored.values[:, :, : 8 * 12], saved.values[:, :, : 8 * 12])
