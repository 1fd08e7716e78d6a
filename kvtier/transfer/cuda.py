"""The CUDA transfer backend: copies on pools of CUDA streams, completion polled with events.

Promises (beyond ``kvtier.transfer.base``):
- ``submit`` enqueues ``cudaMemcpyAsync`` copies (``copy_(..., non_blocking=True)``) on a stream and
  records an event; nothing waits on the GPU in Python.
- Loads run on high-priority streams, stores on low-priority ones, each direction with its own pool.
- Within a direction a job's stream first waits on the previous job's event, so jobs complete in order.
- Completion is seen with ``event.query()`` on the oldest pending job (``poll``), or by synchronizing on
  its event (``Transfer.wait``); events are recycled through a pool.
- ``submit_blocks`` of CUDA tensors on this device into or out of arena rows the device addresses (the
  registered part of the arena) is one launch of the block-copy kernel of ``native/`` (CuPy), after one
  small copy of the address table: a job costs the same few launches for 1 block or 1,000, and the only
  Python per block is building the address lists. Anything else (no CuPy, rows not yet registered, tensors
  on the CPU or another device) takes the per-pair ``submit`` path, which is correct for all of them.
Copies between device memory and pinned host memory are truly asynchronous; from pageable memory CUDA
stages them, which is correct but slower (the host arena is pinned in the background for this reason).
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import ClosedError, TransferError
from kvtier.native import launch_copy_blocks, load_copy_kernel, rows_addressable
from kvtier.transfer.base import (
    CopyPair,
    Direction,
    DoneCallback,
    Transfer,
    TransferEngine,
    check_blocks,
    check_pairs,
)


@dataclass
class _Pending:
    event: torch.cuda.Event
    on_done: DoneCallback
    transfer: _CudaTransfer


class _CudaTransfer(Transfer):
    def __init__(self, engine: CudaTransferEngine) -> None:
        self._engine = engine
        self._finished = threading.Event()
        self.event: torch.cuda.Event | None = None

    def done(self) -> bool:
        if not self._finished.is_set():
            self._engine.poll()
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.event is not None and timeout is None:
            self.event.synchronize()
        self._engine.poll()
        return self._finished.wait(0 if timeout is None else timeout) or self.done()


class CudaTransferEngine(TransferEngine):
    name = "cuda"

    def __init__(self, num_streams: int = 2, device: torch.device | None = None) -> None:
        if not torch.cuda.is_available():
            raise TransferError("the CUDA transfer backend needs a CUDA device")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        # CUDA: a lower number is a higher priority; -1 is the highest torch exposes on every GPU.
        self._streams = {
            Direction.LOAD: [torch.cuda.Stream(self.device, priority=-1) for _ in range(num_streams)],
            Direction.STORE: [torch.cuda.Stream(self.device, priority=0) for _ in range(num_streams)],
        }
        self._next_stream = {direction: itertools.cycle(streams) for direction, streams in self._streams.items()}
        self._last_event: dict[Direction, torch.cuda.Event | None] = {Direction.LOAD: None, Direction.STORE: None}
        self._pending: dict[Direction, collections.deque[_Pending]] = {
            Direction.LOAD: collections.deque(), Direction.STORE: collections.deque()}
        self._free_events: list[torch.cuda.Event] = []
        self._lock = threading.RLock()
        self._closed = False

    def _event(self) -> torch.cuda.Event:
        return self._free_events.pop() if self._free_events else torch.cuda.Event()

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        check_pairs(pairs)

        def copy_all(stream: torch.cuda.Stream) -> None:
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

        return self._enqueue(copy_all, direction, on_done)

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback) -> Transfer:
        nbytes = check_blocks(rows, slots, blocks)
        kernel = load_copy_kernel()
        if (kernel is None or not blocks or rows.device.type != "cpu"
                or any(block.device != self.device for block in blocks)
                or not rows_addressable(rows, min(slots), max(slots), nbytes)):
            return super().submit_blocks(rows, slots, blocks, direction, on_done)
        base, stride = rows.data_ptr(), rows.stride(0)
        slot_addresses = [base + slot * stride for slot in slots]
        block_addresses = [block.data_ptr() for block in blocks]
        dsts, srcs = ((block_addresses, slot_addresses) if direction is Direction.LOAD
                      else (slot_addresses, block_addresses))
        table = torch.tensor([dsts, srcs], dtype=torch.int64)
        vector = nbytes % 16 == 0 and stride % 16 == 0 and base % 16 == 0 and all(a % 16 == 0 for a in block_addresses)

        def launch(stream: torch.cuda.Stream) -> None:
            pointers = table.to(self.device, non_blocking=True)
            launch_copy_blocks(kernel, pointers, len(blocks), nbytes, vector, stream)

        return self._enqueue(launch, direction, on_done)

    def _enqueue(self, work: Callable[[torch.cuda.Stream], None], direction: Direction,
                 on_done: DoneCallback) -> Transfer:
        """Run ``work(stream)`` on the direction's next stream after the previous job, then record an event."""
        transfer = _CudaTransfer(self)
        with self._lock:
            if self._closed:
                raise ClosedError("the transfer engine is closed")
            stream = next(self._next_stream[direction])
            previous = self._last_event[direction]
            try:
                with torch.cuda.stream(stream), torch.no_grad():
                    if previous is not None:
                        stream.wait_event(previous)
                    work(stream)
                    event = self._event()
                    event.record(stream)
            except RuntimeError as exc:
                raise TransferError(f"CUDA copy could not be queued: {exc}") from exc
            transfer.event = event
            self._last_event[direction] = event
            self._pending[direction].append(_Pending(event, on_done, transfer))
        return transfer

    def poll(self) -> int:
        finished: list[_Pending] = []
        with self._lock:
            for queue in self._pending.values():
                while queue and queue[0].event.query():
                    finished.append(queue.popleft())
        for item in finished:
            item.transfer.event = None
            try:
                item.on_done(None)
            finally:
                item.transfer._finished.set()
        with self._lock:
            live = {id(self._last_event[d]) for d in Direction}
            self._free_events.extend(item.event for item in finished if id(item.event) not in live)
        return len(finished)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for streams in self._streams.values():
            for stream in streams:
                stream.synchronize()
        self.poll()
