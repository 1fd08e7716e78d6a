from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from kvtier import ClosedError, ConfigError, InvalidInputError, TransferConfig
from kvtier.transfer import (
    CopyPair,
    CpuTransferEngine,
    Direction,
    DoneCallback,
    Transfer,
    TransferEngine,
    make_transfer_engine,
)
from kvtier.transfer.cpu import MIN_SHARE_BYTES, WAITER_SHARE_WEIGHT, cut_segments


def run_job(engine: TransferEngine, pairs: list[tuple[torch.Tensor, torch.Tensor]],
            direction: Direction = Direction.STORE) -> BaseException | None:
    results: list[BaseException | None] = []
    transfer = engine.submit(pairs, direction, results.append)
    assert transfer.wait(30)
    assert transfer.done()
    return results[0]


def test_cpu_copies_and_reports() -> None:
    engine = CpuTransferEngine(2)
    src = [torch.arange(100, dtype=torch.float32) * i for i in range(5)]
    dst = [torch.empty(100) for _ in src]
    assert run_job(engine, list(zip(dst, src, strict=True))) is None
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    engine.close()
    engine.close()
    with pytest.raises(ClosedError):
        engine.submit([], Direction.LOAD, lambda e: None)


def test_cpu_delivers_copy_errors() -> None:
    engine = CpuTransferEngine(1)
    bad = (torch.empty(4, dtype=torch.uint8), torch.empty(2, dtype=torch.float16))  # same bytes, no broadcast
    error = run_job(engine, [bad])
    assert isinstance(error, RuntimeError)
    engine.close()


def test_mismatched_sizes_are_refused() -> None:
    engine = CpuTransferEngine(1)
    with pytest.raises(InvalidInputError):
        engine.submit([(torch.empty(3), torch.empty(4))], Direction.STORE, lambda e: None)
    engine.close()


def test_loads_jump_ahead_of_queued_stores() -> None:
    engine = CpuTransferEngine(1)
    gate = threading.Event()
    order: list[str] = []
    engine.submit([], Direction.STORE, lambda e: gate.wait(10))  # occupies the only worker
    engine.submit([], Direction.STORE, lambda e: order.append("store"))
    last = engine.submit([], Direction.LOAD, lambda e: order.append("load"))
    gate.set()
    engine.close()
    assert last.done() and order == ["load", "store"]


def test_factory() -> None:
    engine = make_transfer_engine(TransferConfig(backend="cpu"))
    assert engine.name == "cpu"
    engine.close()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            make_transfer_engine(TransferConfig(backend="cuda"))
        assert make_transfer_engine(TransferConfig()).name == "cpu"


@pytest.mark.gpu
def test_cuda_round_trip_and_order() -> None:
    from kvtier.transfer.cuda import CudaTransferEngine

    engine = CudaTransferEngine(2)
    host = [torch.randn(1 << 20).pin_memory() for _ in range(4)]
    device = [torch.empty(1 << 20, device="cuda") for _ in host]
    back = [torch.empty(1 << 20).pin_memory() for _ in host]
    done: list[str] = []
    engine.submit(list(zip(device, host, strict=True)), Direction.LOAD, lambda e: done.append("load"))
    t = engine.submit(list(zip(back, device, strict=True)), Direction.STORE, lambda e: done.append("store"))
    assert t.wait()
    engine.close()
    assert sorted(done) == ["load", "store"]
    assert all(torch.equal(a, b) for a, b in zip(host, back, strict=True))


# -- whole blocks between arena rows and caller tensors ----------------------------------------------------


class _PairsOnly(TransferEngine):
    """An engine with only ``submit``: ``submit_blocks`` takes the base class's pairs path."""

    def __init__(self) -> None:
        self.inner = CpuTransferEngine(1)

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        return self.inner.submit(pairs, direction, on_done)

    def poll(self) -> int:
        return 0

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("engine_kind", ["cpu", "pairs"])
def test_submit_blocks_round_trips_through_rows(engine_kind: str) -> None:
    engine: TransferEngine = CpuTransferEngine(2) if engine_kind == "cpu" else _PairsOnly()
    rows = torch.zeros(6, 4096, dtype=torch.uint8)
    blocks = [torch.randn(250) for _ in range(4)]  # 1,000 bytes each, narrower than a row
    results: list[BaseException | None] = []
    assert engine.submit_blocks(rows, [5, 0, 3, 1], blocks, Direction.STORE, results.append).wait(30)
    assert torch.equal(rows[5, :1000], blocks[0].view(torch.uint8)) and torch.count_nonzero(rows[[2, 4]]) == 0
    outputs = [torch.empty(250) for _ in blocks]
    assert engine.submit_blocks(rows, [5, 0, 3, 1], outputs, Direction.LOAD, results.append).wait(30)
    assert results == [None, None]
    assert all(torch.equal(out, block) for out, block in zip(outputs, blocks, strict=True))
    engine.close()


@pytest.mark.parametrize("slots, blocks", [
    ([6], [torch.zeros(4)]),  # slot out of range
    ([-1], [torch.zeros(4)]),
    ([0, 1], [torch.zeros(4)]),  # one slot too many
    ([0, 1], [torch.zeros(4), torch.zeros(8)]),  # blocks of unequal size
    ([0], [torch.zeros(2048)]),  # wider than a row
    ([0], [torch.zeros(8)[::2]]),  # not contiguous
])
def test_submit_blocks_checks_its_arguments(slots: list[int], blocks: list[torch.Tensor]) -> None:
    engine = CpuTransferEngine(1)
    rows = torch.zeros(6, 4096, dtype=torch.uint8)
    with pytest.raises(InvalidInputError):
        engine.submit_blocks(rows, slots, blocks, Direction.STORE, lambda error: None)
    with pytest.raises(InvalidInputError):
        engine.submit_blocks(rows.view(torch.int8), [0], [torch.zeros(4)], Direction.STORE, lambda error: None)
    assert torch.count_nonzero(rows) == 0
    engine.close()


@pytest.mark.gpu
def test_cuda_submit_blocks_is_one_launch_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.arena import HostArena
    from kvtier.native import load_copy_kernel
    from kvtier.transfer import cuda as cuda_engine

    if load_copy_kernel() is None:
        pytest.skip("needs CuPy")
    launches: list[int] = []
    real_launch = cuda_engine.launch_copy_blocks

    def recording(*args: object, **kwargs: object) -> None:
        launches.append(1)
        real_launch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cuda_engine, "launch_copy_blocks", recording)
    arena = HostArena(16, 8192)
    arena.start_pinning(8192)
    assert arena.wait_pinned(30)
    engine = cuda_engine.CudaTransferEngine(2)
    try:
        blocks = [torch.randn(2048, device="cuda") for _ in range(12)]
        slots = list(range(15, 3, -1))
        assert engine.submit_blocks(arena.rows(), slots, blocks, Direction.STORE, lambda error: None).wait()
        outputs = [torch.empty_like(block) for block in blocks]
        assert engine.submit_blocks(arena.rows(), slots, outputs, Direction.LOAD, lambda error: None).wait()
        assert launches == [1, 1]
        assert all(torch.equal(out, block) for out, block in zip(outputs, blocks, strict=True))
    finally:
        engine.close()
        arena.close()


@pytest.mark.parametrize("num_blocks, nbytes, num_shares, weight", [
    (1, 3 * 2**20 + 4096, 2, 1.0), (3, 2**20 + 512, 3, 1.0), (5, 4096, 2, 1.0), (2, 100, 1, 1.0),
    (1, 8 * 2**20, 2, WAITER_SHARE_WEIGHT), (3, 2**20 + 512, 3, 1.3), (5, 4096, 2, 1.3)])
def test_cut_segments_cover_every_byte_once(num_blocks: int, nbytes: int, num_shares: int, weight: float) -> None:
    dsts = [10**9 * (i + 1) for i in range(num_blocks)]
    srcs = [10**9 * (i + 1) + 5 * 10**8 for i in range(num_blocks)]
    shares = cut_segments(dsts, srcs, nbytes, num_shares, weight)
    assert len(shares) == num_shares
    sizes = [sum(length for _, _, length in share) for share in shares]
    # Every share but the last about equal; the last (a waiter's) ``weight`` times them, to a page.
    assert max(sizes[:-1], default=0) - min(sizes[:-1], default=0) <= 4096
    assert sizes[:-1] == [] or abs(sizes[-1] - weight * sizes[0]) <= 2 * 4096 * weight
    covered = sorted((dst, length, src - dst) for share in shares for dst, src, length in share)
    for i, dst in enumerate(dsts):  # each block's bytes, contiguous and in order, src at the same offset
        runs = [(d, n) for d, n, shift in covered if dst <= d < dst + nbytes and shift == srcs[i] - dst]
        position = dst
        for start, length in runs:
            assert start == position
            position += length
        assert position == dst + nbytes


def test_one_large_block_is_copied_by_every_worker_and_round_trips() -> None:
    engine = CpuTransferEngine(2)
    nbytes = 2 * MIN_SHARE_BYTES + 12_288  # two shares, the cut inside the block
    rows = torch.zeros(2, nbytes + 4096, dtype=torch.uint8)
    block = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    results: list[BaseException | None] = []
    assert engine.submit_blocks(rows, [1], [block], Direction.STORE, results.append).wait(30)
    out = torch.empty_like(block)
    transfer = engine.submit_blocks(rows, [1], [out], Direction.LOAD,
                                    results.append)
    assert transfer.wait(30)
    assert results == [None, None] and torch.equal(out, block) and torch.equal(rows[1, :nbytes], block)
    assert torch.count_nonzero(rows[0]) == 0 and torch.count_nonzero(rows[1, nbytes:]) == 0
    engine.close()


def _waits_for(gate: threading.Event) -> DoneCallback:
    def on_done(error: BaseException | None) -> None:
        gate.wait(10)

    return on_done


def test_help_runs_one_queued_share_on_the_waiting_thread() -> None:
    engine = CpuTransferEngine(1)
    gate = threading.Event()
    engine.submit([], Direction.STORE, _waits_for(gate))  # occupies the only worker
    nbytes = 2 * MIN_SHARE_BYTES
    rows = torch.zeros(2, nbytes, dtype=torch.uint8)
    block = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    done_on: list[str] = []
    one = engine.submit_blocks(rows, [0], [block[: nbytes // 2].clone()], Direction.STORE,
                               lambda e: done_on.append(threading.current_thread().name))
    assert vars(one)["whole"] is None  # blocks under WHOLE_MIN_BLOCK_BYTES: copied in shares only
    one.help()  # one share, no worker free: the caller copies it and runs on_done
    assert one.done() and done_on == [threading.current_thread().name]
    assert torch.equal(rows[0, : nbytes // 2], block[: nbytes // 2])
    gate.set()
    engine.close()
    engine = CpuTransferEngine(2)
    gates = [threading.Event() for _ in range(2)]
    for g in gates:  # both workers busy
        engine.submit([], Direction.STORE, _waits_for(g))
    results: list[BaseException | None] = []
    two = engine.submit_blocks(rows, [1], [block], Direction.STORE, results.append)  # two shares, both queued
    two.help()  # every share still queued: the waiter copies the whole job (torch) and completes it
    assert two.done() and results == [None] and torch.equal(rows[1], block)
    out = torch.empty_like(block)
    back = engine.submit_blocks(rows, [1], [out], Direction.LOAD, results.append)
    back.help()
    assert back.done() and results == [None, None] and torch.equal(out, block)
    # Another thread waiting takes one share only (a torch pool per waiting thread would crowd the cores).
    other = engine.submit_blocks(rows, [0], [block], Direction.STORE, results.append)
    helper = threading.Thread(target=other.help)
    helper.start()
    helper.join(30)
    assert not other.done() and torch.equal(rows[0, -(nbytes // 2):], block[-(nbytes // 2):])
    for g in gates:
        g.set()
    assert other.wait(30) and torch.equal(rows[0], block)
    engine.close()


def test_help_runs_one_share_when_a_worker_started_the_job() -> None:
    engine = CpuTransferEngine(1)
    started, gate = threading.Event(), threading.Event()
    ran_on: list[str] = []
    whole: list[int] = []

    def first() -> None:
        started.set()
        gate.wait(10)

    results: list[BaseException | None] = []
    transfer = engine._queue_shares([first, lambda: ran_on.append(threading.current_thread().name)],
                                    Direction.STORE, results.append, lambda: whole.append(1))
    assert started.wait(10)  # the worker holds the first share
    transfer.help()
    assert ran_on == [threading.current_thread().name] and not whole and not transfer.done()
    gate.set()
    assert transfer.wait(10) and results == [None]
    engine.close()


def test_help_puts_shares_back_with_tokens_when_a_worker_takes_one_meanwhile() -> None:
    engine = CpuTransferEngine(0)  # no worker: the queue is the test's

    class Racing(deque[Any]):
        """The second removal finds its task gone, as when a worker popped it between two removals."""

        removals = 0

        def remove(self, value: Any) -> None:
            Racing.removals += 1
            if Racing.removals == 2:
                raise ValueError("taken meanwhile")
            super().remove(value)

    engine._work = (Racing(), deque())
    ran: list[str] = []
    whole: list[int] = []
    transfer = engine._queue_shares([lambda: ran.append("first"), lambda: ran.append("second")], Direction.LOAD,
                                    lambda error: None, lambda: whole.append(1))
    transfer.help()
    # Nothing taken for good but the share ``help`` ran; the other is back in the queue with a token of its own.
    assert not whole and len(engine._work[0]) == 1 and engine._tokens.qsize() == 3
    engine._work[0].popleft()[0]()
    assert sorted(ran) == ["first", "second"]
    engine.close()


def test_a_whole_job_that_fails_reaches_its_callback_once() -> None:
    engine = CpuTransferEngine(0)  # no worker: every share stays queued for the waiter
    results: list[BaseException | None] = []

    def broken() -> None:
        raise OSError("copy failed")

    transfer = engine._queue_shares([lambda: None, lambda: None], Direction.STORE, results.append, broken)
    transfer.help()
    assert transfer.done() and len(results) == 1 and isinstance(results[0], OSError)
    assert not engine._work[Direction.STORE]  # both shares taken, none left to run again
    engine.close()
