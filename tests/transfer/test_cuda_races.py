"""Races between the caller's stream and the store's copies, made certain with ``torch.cuda._sleep``.

Each test queues a long sleep on the stream whose work must come first, so that a copy not ordered
after it (or a tensor not kept alive for it) gives wrong bytes every time, never by luck.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvtier import HostConfig, KVLayout, Store, StoreConfig
from kvtier.transfer import Direction

# About 0.1-0.3 s on current GPUs: far longer than queueing a job takes on the host.
SLEEP_CYCLES = 300_000_000
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["registered", "pageable"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    from kvtier.transfer.cuda import CudaTransferEngine

    pin = request.param == "registered"
    config = StoreConfig(host=HostConfig(capacity_bytes=16 * LAYOUT.block_bytes, pin=pin, prefault=False))
    opened = Store(LAYOUT, config, transfer=CudaTransferEngine(2))
    if pin:
        opened.pin_for(torch.device("cuda", torch.cuda.current_device()))
        assert opened.arena.wait_pinned(60)
    yield opened
    opened.close()


def _keys(store: Store, count: int, salt: str = "") -> list[bytes]:
    return store.hasher("races" + salt).keys(list(range(count * LAYOUT.block_tokens)))


def _blocks(count: int, value: float) -> list[torch.Tensor]:
    return [torch.full(LAYOUT.block_shape, value, dtype=torch.float32, device="cuda") for _ in range(count)]


def test_a_put_stores_what_the_callers_queued_kernel_wrote(store: Store) -> None:
    keys = _keys(store, 4)
    blocks = _blocks(4, 0.0)
    torch.cuda._sleep(SLEEP_CYCLES)
    for block in blocks:
        block.fill_(7.0)  # queued behind the sleep on the caller's stream
    assert store.put(keys, blocks).wait(60).ok
    out = _blocks(4, -1.0)
    assert store.get(keys, out).wait(60).ok
    torch.cuda.synchronize()
    assert all(bool((block == 7.0).all()) for block in out)


def test_a_get_lands_after_the_callers_queued_writes(store: Store) -> None:
    keys = _keys(store, 4)
    assert store.put(keys, _blocks(4, 3.0)).wait(60).ok
    out = _blocks(4, 0.0)
    torch.cuda._sleep(SLEEP_CYCLES)
    for block in out:
        block.fill_(9.0)  # an earlier write to the destination, still queued when the get is asked for
    assert store.get(keys, out).wait(60).ok
    torch.cuda.synchronize()
    assert all(bool((block == 3.0).all()) for block in out)


def test_a_put_source_freed_and_reused_before_its_copy_keeps_its_bytes(store: Store) -> None:
    keys = _keys(store, 4)
    blocks = _blocks(4, 5.0)
    torch.cuda.synchronize()
    # Hold the engine's store streams back, so the put's copy runs long after the caller moved on.
    engine = store.transfer
    streams = [stream for lane in engine._lanes.values() for stream in lane.all_streams]  # type: ignore[attr-defined]
    if not streams:
        engine.submit([], Direction.STORE, lambda error: None).wait(60)
        streams = [stream for lane in engine._lanes.values() for stream in lane.all_streams]  # type: ignore[attr-defined]
    for stream in streams:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SLEEP_CYCLES)
    job = store.put(keys, blocks)
    del blocks
    reused = _blocks(4, 8.0)  # the caching allocator's next blocks of this size: the freed ones, unless tied
    job_result = job.wait(60)
    assert job_result.ok
    out = _blocks(4, -1.0)
    assert store.get(keys, out).wait(60).ok
    torch.cuda.synchronize()
    assert all(bool((block == 5.0).all()) for block in out)
    del reused


def test_closing_an_arena_waits_for_the_kernel_reading_it() -> None:
    from kvtier.arena import HostArena
    from kvtier.native import PagedKV, load_kernels

    if load_kernels() is None:
        pytest.skip("needs CuPy")
    arena = HostArena(4, 64 * 1024)
    arena.rows().fill_(3)
    arena.start_pinning(64 * 1024, torch.device("cuda", torch.cuda.current_device()))
    assert arena.wait_pinned(60)
    pages = torch.zeros(4, 64 * 1024, dtype=torch.uint8, device="cuda")
    paged = PagedKV([pages])
    torch.cuda._sleep(SLEEP_CYCLES)  # the scatter below reads the arena long after close is called
    paged.scatter_from_slots([0, 1, 2, 3], arena.rows(), [3, 2, 1, 0])
    arena.close()
    torch.cuda.synchronize()
    assert bool((pages == 3).all())
