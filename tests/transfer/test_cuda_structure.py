"""The CUDA transfer engine's structure on a CPU, through a recording stand-in for its CUDA calls.

What each job queues and in which order (the caller's stream first), which tensors are tied to the job's
stream and held until its event, which device's streams and events a job uses, how many uploads and
launches a batch costs, and that ``Transfer.wait`` returns when the job completes.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any

import pytest
import torch
from cuda_fakes import FakeOps

from kvtier import InvalidInputError
from kvtier.transfer import Direction
from kvtier.transfer.cuda import CudaTransferEngine

CUDA0 = torch.device("cuda", 0)


def _engine(ops: FakeOps, num_streams: int = 2) -> CudaTransferEngine:
    return CudaTransferEngine(num_streams, device=CUDA0, ops=ops)


def _index(log: list[tuple[Any, ...]], entry: tuple[Any, ...]) -> int:
    return log.index(entry)


@pytest.mark.parametrize("path", ["pairs", "kernel"])
@pytest.mark.parametrize("direction", [Direction.STORE, Direction.LOAD])
def test_a_job_waits_for_the_callers_stream_before_it_copies(path: str, direction: Direction) -> None:
    ops = FakeOps()
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    block = ops.on_device(torch.arange(64, dtype=torch.uint8))
    if path == "pairs":
        pair = (rows[2], block) if direction is Direction.STORE else (block, rows[2])
        transfer = engine.submit([pair], direction, lambda error: None)
    else:
        transfer = engine.submit_blocks(rows, [2], [block], direction, lambda error: None)
    caller = ops.callers[CUDA0].name
    fence_record = next(entry for entry in ops.log if entry[0] == "record" and entry[2] == caller)
    job_stream = next(entry[1] for entry in ops.log if entry[0] == "enter")
    wait = ("wait", job_stream, fence_record[1])
    # The fence is recorded on the caller's stream, the job's stream waits on it, and only then copies.
    assert _index(ops.log, fence_record) < _index(ops.log, wait)
    first_copy = next(i for i, entry in enumerate(ops.log) if entry[0] in ("launch", "upload", "record_stream"))
    assert _index(ops.log, wait) < first_copy
    assert transfer.wait(30)
    if direction is Direction.STORE:
        assert torch.equal(rows[2], block)
    engine.close()


def test_caller_tensors_are_tied_to_the_job_stream_and_held_until_its_event() -> None:
    ops = FakeOps(auto_complete=False)
    engine = _engine(ops)
    rows = torch.zeros(4, 256, dtype=torch.uint8)
    blocks = [ops.on_device(torch.full((256,), i, dtype=torch.uint8)) for i in range(3)]
    pointers = [block.data_ptr() for block in blocks]
    refs = [weakref.ref(block) for block in blocks]
    done: list[BaseException | None] = []
    transfer = engine.submit_blocks(rows, [3, 0, 1], blocks, Direction.STORE, done.append)
    del blocks
    job_stream = next(entry[1] for entry in ops.log if entry[0] == "enter")
    tied = {entry[1] for entry in ops.log if entry[0] == "record_stream" and entry[2] == job_stream}
    assert set(pointers) <= tied
    gc.collect()
    assert all(ref() is not None for ref in refs), "a caller tensor was let go before its copy ran"
    assert engine.poll() == 0 and not transfer.done() and done == []
    ops.complete_all()
    assert transfer.wait(30) and done == [None]
    gc.collect()
    assert all(ref() is None for ref in refs)
    engine.close()


def test_a_batch_is_one_upload_and_one_launch_from_host_arrays() -> None:
    ops = FakeOps()
    engine = _engine(ops)
    rows = torch.zeros(16, 4096, dtype=torch.uint8)
    blocks = [ops.on_device(torch.randn(512)) for _ in range(12)]
    slots = list(range(15, 3, -1))
    assert engine.submit_blocks(rows, slots, blocks, Direction.STORE, lambda error: None).wait(30)
    outputs = [ops.on_device(torch.empty(512)) for _ in blocks]
    assert engine.submit_blocks(rows, slots, outputs, Direction.LOAD, lambda error: None).wait(30)
    assert ops.launches == 2 and len(ops.uploads) == 2
    assert all(torch.equal(out, block) for out, block in zip(outputs, blocks, strict=True))
    assert ops.uploads[0].shape == (2, 12)
    # Two jobs: per job one fence, one completion event (recycled once the job completed).
    assert len(ops.events) <= 4
    engine.close()


def test_rows_the_device_cannot_address_take_the_pairs_path() -> None:
    ops = FakeOps(addressable=False)
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    block = ops.on_device(torch.ones(64, dtype=torch.uint8))
    assert engine.submit_blocks(rows, [1], [block], Direction.STORE, lambda error: None).wait(30)
    assert ops.launches == 0 and ops.uploads == [] and torch.equal(rows[1], block)
    engine.close()


def test_each_device_has_its_own_streams_and_events() -> None:
    ops = FakeOps()
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    on_one = ops.on_device(torch.ones(64, dtype=torch.uint8), index=1)
    assert engine.submit_blocks(rows, [0], [on_one], Direction.STORE, lambda error: None).wait(30)
    cuda1 = torch.device("cuda", 1)
    assert ops.streams and all(stream.device == cuda1 for stream in ops.streams)
    assert ("addressable?", "cuda:1") in ops.log and ("upload", "cuda:1", ops.streams[-1].name) not in ops.log
    job_stream = next(entry[1] for entry in ops.log if entry[0] == "enter")
    assert job_stream.startswith("cuda:1") and ops.callers.keys() == {cuda1}
    on_zero = ops.on_device(torch.ones(64, dtype=torch.uint8), index=0)
    with pytest.raises(InvalidInputError):
        engine.submit([(on_zero, on_one)], Direction.STORE, lambda error: None)
    with pytest.raises(InvalidInputError):
        engine.submit_blocks(rows, [0, 1], [on_zero, on_one], Direction.STORE, lambda error: None)
    engine.close()


def test_jobs_of_one_direction_are_chained_loads_first_in_priority() -> None:
    ops = FakeOps()
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    blocks = [ops.on_device(torch.ones(64, dtype=torch.uint8)) for _ in range(2)]
    engine.submit_blocks(rows, [0], blocks[:1], Direction.STORE, lambda error: None)
    first_event = [entry for entry in ops.log if entry[0] == "record"][-1]
    engine.submit_blocks(rows, [1], blocks[1:], Direction.STORE, lambda error: None)
    second_stream = [entry[1] for entry in ops.log if entry[0] == "enter"][-1]
    assert ("wait", second_stream, first_event[1]) in ops.log
    priorities = {stream.priority for stream in ops.streams if stream.name.endswith(("/0", "/1"))}
    assert priorities == {-1}  # the first streams made are the load pool's, at the highest priority
    engine.close()


def test_wait_returns_when_the_job_completes_not_at_its_timeout() -> None:
    ops = FakeOps(auto_complete=False)
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    block = ops.on_device(torch.ones(64, dtype=torch.uint8))
    transfer = engine.submit_blocks(rows, [0], [block], Direction.STORE, lambda error: None)
    assert not transfer.wait(0.01)
    timer = threading.Timer(0.2, ops.complete_all)
    timer.start()
    started = time.monotonic()
    assert transfer.wait(120)
    assert time.monotonic() - started < 60  # returned at completion, long before the timeout
    timer.join()
    engine.close()


def test_close_synchronizes_every_stream_of_every_device_and_runs_callbacks() -> None:
    ops = FakeOps(auto_complete=False)
    engine = _engine(ops)
    rows = torch.zeros(4, 64, dtype=torch.uint8)
    done: list[BaseException | None] = []
    for index in (0, 1):
        block = ops.on_device(torch.ones(64, dtype=torch.uint8), index=index)
        engine.submit_blocks(rows, [index], [block], Direction.STORE, done.append)
    engine.close()
    synchronized = {entry[1] for entry in ops.log if entry[0] == "synchronize"}
    assert synchronized == {stream.name for stream in ops.streams} and done == [None, None]
