"""The CUDA transfer backend: copies on pools of CUDA streams, completion polled with events.

Promises (beyond ``kvtier.transfer.base``):
- ``submit`` enqueues ``cudaMemcpyAsync`` copies (``copy_(..., non_blocking=True)``) on a stream and
  records an event; nothing waits on the GPU in Python.
- **Ordered after the caller.** A job's stream first waits for the caller's current stream on the job's
  device (an event recorded there), so a put copies what the caller's queued kernels wrote, and a get
  writes only after the caller's queued work on its tensors ran.
- **Caller tensors live until the copy ran.** Each CUDA tensor of a job is tied to the job's stream
  (``record_stream``: the caching allocator reuses its memory only after the copy), and every tensor of
  the job (pinned host tensors too, which torch cannot track through a kernel's raw pointers) is held
  until the job's event completed.
- **Per device.** A job runs on streams and events of the device its CUDA tensors are on (one device per
  job, else ``InvalidInputError``); each device has its own pools, created at its first job.
- Loads run on high-priority streams, stores on low-priority ones, each direction with its own pool.
  Within a direction and device a job's stream also waits on the previous job's event: jobs complete in
  order. Completion is seen with ``event.query()`` on the oldest pending job (``poll``); ``Transfer.wait``
  returns as soon as its job completed (within about a millisecond), or at its timeout.
- ``submit_blocks`` of CUDA tensors into or out of arena rows the device addresses (the registered part
  of the arena) is one launch of the block-copy kernel of ``native/`` (CuPy), sized to saturate the host
  link with a few SMs, after one upload of the address table from a page-locked buffer (never pageable
  memory, which would make CUDA synchronise): a job costs the same few launches for 1 block or 1,000.
  Anything else (no CuPy, rows not yet registered) takes the per-pair ``submit`` path, which is correct.
- ``close`` finishes every queued job (each device's streams synchronised) and runs their callbacks.
Copies between device memory and pinned host memory are truly asynchronous; from pageable memory CUDA
stages them, which is correct but slower (the host arena is registered in the background for this reason).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtier.errors import ClosedError, InvalidInputError, TransferError
from kvtier.native import launch_copy_blocks, load_copy_kernel, rows_addressable, upload_table
from kvtier.transfer.base import (
    CopyPair,
    Direction,
    DoneCallback,
    Transfer,
    TransferEngine,
    check_blocks,
    check_pairs,
)

# ``Transfer.wait`` with a timeout polls, backing off up to this many seconds between polls.
_MAX_POLL_S = 1e-3


class CudaOps:
    """The CUDA calls the engine makes, in one place so that a recording stand-in can check them on a CPU."""

    def device_of(self, tensor: torch.Tensor) -> torch.device:
        return tensor.device

    def stream(self, device: torch.device, priority: int) -> Any:
        return torch.cuda.Stream(device, priority=priority)

    def event(self) -> Any:
        return torch.cuda.Event()

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def copy_kernel(self) -> Any | None:
        return load_copy_kernel()

    def rows_addressable(self, rows: torch.Tensor, first: int, last: int, nbytes: int, device: torch.device) -> bool:
        return rows_addressable(rows, first, last, nbytes, device)

    def upload(self, table: np.ndarray, device: torch.device, stream: Any) -> torch.Tensor:
        return upload_table(table, device, stream)

    def launch_copy_blocks(self, kernel: Any, pointers: torch.Tensor, num_blocks: int, nbytes: int, vector: bool,
                           stream: Any) -> None:
        launch_copy_blocks(kernel, pointers, num_blocks, nbytes, vector, stream)


@dataclass
class _Pending:
    event: Any
    on_done: DoneCallback
    transfer: _CudaTransfer
    # The job's tensors, held until its event completed (see the module promises).
    tensors: tuple[torch.Tensor, ...]


@dataclass
class _Lane:
    """One device's streams, ordering events and pending jobs."""

    streams: dict[Direction, Iterator[Any]]
    fence: Any  # recorded on the caller's stream, waited on by the job's stream
    last_event: dict[Direction, Any] = field(default_factory=lambda: dict.fromkeys(Direction))
    pending: dict[Direction, collections.deque[_Pending]] = field(
        default_factory=lambda: {direction: collections.deque() for direction in Direction})
    free_events: list[Any] = field(default_factory=list)
    all_streams: list[Any] = field(default_factory=list)


class _CudaTransfer(Transfer):
    def __init__(self, engine: CudaTransferEngine) -> None:
        self._engine = engine
        self._finished = threading.Event()
        self.event: Any = None

    def done(self) -> bool:
        if not self._finished.is_set():
            self._engine.poll()
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        event = self.event
        if timeout is None:
            if event is not None:
                event.synchronize()
            self._engine.poll()
            # Another thread may be running this job's callback: it sets the flag once it returned.
            return self._finished.wait()
        deadline = time.monotonic() + timeout
        delay = 5e-5
        while not self.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(2 * delay, _MAX_POLL_S)
        return True


def job_device(devices_of: Sequence[torch.device], default: torch.device) -> torch.device:
    """The one CUDA device among ``devices_of`` (``default`` when none is CUDA), or ``InvalidInputError``."""
    devices = {device for device in devices_of if device.type == "cuda"}
    if len(devices) > 1:
        raise InvalidInputError(f"one copy job spans several devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else default


class CudaTransferEngine(TransferEngine):
    name = "cuda"

    def __init__(self, num_streams: int = 2, device: torch.device | None = None, ops: CudaOps | None = None) -> None:
        self._ops = ops or CudaOps()
        if ops is None and not torch.cuda.is_available():
            raise TransferError("the CUDA transfer backend needs a CUDA device")
        # Jobs without a CUDA tensor (host to host) run here; ``cuda`` alone is resolved per job.
        self.device = device or torch.device("cuda")
        self._num_streams = num_streams
        self._lanes: dict[torch.device, _Lane] = {}
        self._lock = threading.RLock()
        self._closed = False

    def _lane(self, device: torch.device) -> _Lane:
        lane = self._lanes.get(device)
        if lane is None:
            # CUDA: a lower number is a higher priority; -1 is the highest torch exposes on every GPU.
            pools = {direction: [self._ops.stream(device, -1 if direction is Direction.LOAD else 0)
                                 for _ in range(self._num_streams)] for direction in Direction}
            lane = _Lane({direction: itertools.cycle(streams) for direction, streams in pools.items()},
                         self._ops.event(), all_streams=[s for streams in pools.values() for s in streams])
            self._lanes[device] = lane
        return lane

    def _resolve(self, device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def fence(self, tensors: Sequence[torch.Tensor]) -> object | None:
        """An event recorded now on the calling thread's current stream of ``tensors``' device."""
        device = self._resolve(job_device([self._ops.device_of(t) for t in tensors], self.device))
        if device.type != "cuda":
            return None
        event: object = self._ops.event()
        event.record(self._ops.current_stream(device))  # type: ignore[attr-defined]
        return event

    def submit(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback) -> Transfer:
        return self._submit_pairs(pairs, direction, on_done, None)

    def _submit_pairs(self, pairs: Sequence[CopyPair], direction: Direction, on_done: DoneCallback,
                      after: object | None) -> Transfer:
        check_pairs(pairs)
        tensors = tuple(tensor for pair in pairs for tensor in pair)
        device = self._resolve(job_device([self._ops.device_of(t) for t in tensors], self.device))

        def copy_all(stream: Any) -> None:
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

        return self._enqueue(device, copy_all, tensors, direction, on_done, after)

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer:
        nbytes = check_blocks(rows, slots, blocks)
        devices = [self._ops.device_of(block) for block in blocks]
        device = self._resolve(job_device(devices, self.device))
        kernel = self._ops.copy_kernel() if blocks and rows.device.type == "cpu" else None
        if (kernel is None or any(where != device for where in devices)
                or not self._ops.rows_addressable(rows, min(slots), max(slots), nbytes, device)):
            views = [rows[slot, :nbytes] for slot in slots]
            flat = [block.reshape(-1).view(torch.uint8) for block in blocks]
            pairs = list(zip(flat, views, strict=True)) if direction is Direction.LOAD else list(
                zip(views, flat, strict=True))
            return self._submit_pairs(pairs, direction, on_done, after)
        base, stride = rows.data_ptr(), rows.stride(0)
        slot_addresses = base + np.asarray(slots, dtype=np.int64) * stride
        block_addresses = np.fromiter((block.data_ptr() for block in blocks), dtype=np.int64, count=len(blocks))
        dsts, srcs = ((block_addresses, slot_addresses) if direction is Direction.LOAD
                      else (slot_addresses, block_addresses))
        table = np.stack((dsts, srcs))
        vector = nbytes % 16 == 0 and stride % 16 == 0 and base % 16 == 0 and not (block_addresses % 16).any()

        def launch(stream: Any) -> None:
            pointers = self._ops.upload(table, device, stream)
            self._ops.launch_copy_blocks(kernel, pointers, len(blocks), nbytes, vector, stream)

        return self._enqueue(device, launch, (rows, *blocks), direction, on_done, after)

    def _enqueue(self, device: torch.device, work: Callable[[Any], None], tensors: tuple[torch.Tensor, ...],
                 direction: Direction, on_done: DoneCallback, after: object | None) -> Transfer:
        """Run ``work(stream)`` on ``device``'s next stream after the caller's stream (or ``after``) and the
        previous job."""
        transfer = _CudaTransfer(self)
        with self._lock:
            if self._closed:
                raise ClosedError("the transfer engine is closed")
            lane = self._lane(device)
            stream = next(lane.streams[direction])
            previous = lane.last_event[direction]
            try:
                if after is None:
                    # A wait captures the fence's state when it is queued: re-recording it later is safe.
                    lane.fence.record(self._ops.current_stream(device))
                with self._ops.use_stream(stream), torch.no_grad():
                    stream.wait_event(lane.fence if after is None else after)
                    if previous is not None:
                        stream.wait_event(previous)
                    work(stream)
                    for tensor in tensors:
                        if self._ops.device_of(tensor).type == "cuda":
                            self._ops.record_stream(tensor, stream)
                    event = lane.free_events.pop() if lane.free_events else self._ops.event()
                    event.record(stream)
            except RuntimeError as exc:
                raise TransferError(f"CUDA copy could not be queued: {exc}") from exc
            transfer.event = event
            lane.last_event[direction] = event
            lane.pending[direction].append(_Pending(event, on_done, transfer, tensors))
        return transfer

    def poll(self) -> int:
        finished: list[tuple[_Lane, _Pending]] = []
        with self._lock:
            for lane in self._lanes.values():
                for queue in lane.pending.values():
                    while queue and queue[0].event.query():
                        finished.append((lane, queue.popleft()))
        for _, item in finished:
            item.transfer.event = None
            item.tensors = ()
            try:
                item.on_done(None)
            finally:
                item.transfer._finished.set()
        with self._lock:
            for lane, item in finished:
                if all(item.event is not last for last in lane.last_event.values()):
                    lane.free_events.append(item.event)
        return len(finished)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = [stream for lane in self._lanes.values() for stream in lane.all_streams]
        for stream in streams:
            self._ops.synchronize(stream)
        self.poll()
