"""A recording stand-in for the CUDA calls of ``CudaTransferEngine`` (``CudaOps``), for tests on a CPU.

Streams and events log what is queued on them; an event completes at once, or (``auto_complete=False``)
when the test says so (``complete_all``) or its stream is synchronised. Tensors registered with
``on_device`` count as memory of a CUDA device; the block-copy "kernel" copies with ``ctypes.memmove``
at launch, so bytes can be checked too.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvtier.transfer.cuda import CudaOps


class FakeEvent:
    _ids = itertools.count()

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.id = next(self._ids)
        self.log = log
        self.stream: FakeStream | None = None
        self.completed = True

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", self.id, stream.name))
        self.stream = stream
        self.completed = stream.auto_complete

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        self.completed = True


class FakeStream:
    def __init__(self, name: str, device: torch.device, priority: int, log: list[tuple[Any, ...]]) -> None:
        self.name, self.device, self.priority, self.log = name, device, priority, log
        self.auto_complete = True
        self.cuda_stream = id(self)

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait", self.name, event.id))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name))


class FakeOps(CudaOps):
    def __init__(self, kernel: bool = True, addressable: bool = True, auto_complete: bool = True) -> None:
        self.auto_complete = auto_complete
        self.log: list[tuple[Any, ...]] = []
        self.events: list[FakeEvent] = []
        self.streams: list[FakeStream] = []
        self.callers: dict[torch.device, FakeStream] = {}
        self.devices: dict[int, torch.device] = {}
        self.kernel = object() if kernel else None
        self.addressable = addressable
        self.uploads: list[np.ndarray] = []
        self.launches = 0
        self.current: FakeStream | None = None

    def on_device(self, tensor: torch.Tensor, index: int = 0) -> torch.Tensor:
        self.devices[tensor.data_ptr()] = torch.device("cuda", index)
        return tensor

    def device_of(self, tensor: torch.Tensor) -> torch.device:
        return self.devices.get(tensor.data_ptr(), tensor.device)

    def stream(self, device: torch.device, priority: int) -> FakeStream:
        stream = FakeStream(f"{device}/p{priority}/{len(self.streams)}", device, priority, self.log)
        stream.auto_complete = self.auto_complete
        self.streams.append(stream)
        return stream

    def event(self) -> FakeEvent:
        event = FakeEvent(self.log)
        self.events.append(event)
        return event

    def current_stream(self, device: torch.device) -> FakeStream:
        if device not in self.callers:
            self.callers[device] = FakeStream(f"caller:{device}", device, 0, self.log)
        return self.callers[device]

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        self.log.append(("enter", stream.name))
        self.current = stream
        try:
            yield
        finally:
            self.current = None
            self.log.append(("exit", stream.name))

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", tensor.data_ptr(), stream.name))

    def synchronize(self, stream: FakeStream) -> None:
        stream.synchronize()
        for event in self.events:
            if event.stream is stream:
                event.completed = True

    def copy_kernel(self) -> Any | None:
        return self.kernel

    def rows_addressable(self, rows: torch.Tensor, first: int, last: int, nbytes: int, device: torch.device) -> bool:
        self.log.append(("addressable?", str(device)))
        return self.addressable

    def upload(self, table: np.ndarray, device: torch.device, stream: Any) -> torch.Tensor:
        assert isinstance(table, np.ndarray), "tables travel as host arrays, never as per-call torch tensors"
        self.log.append(("upload", str(device), stream.name))
        self.uploads.append(table.copy())
        return torch.from_numpy(table.copy())

    def launch_copy_blocks(self, kernel: Any, pointers: torch.Tensor, num_blocks: int, nbytes: int, vector: bool,
                           stream: Any) -> None:
        assert self.current is stream, "the kernel must launch on the job's stream"
        self.log.append(("launch", stream.name, num_blocks))
        self.launches += 1
        for dst, src in zip(pointers[0].tolist(), pointers[1].tolist(), strict=True):
            ctypes.memmove(dst, src, nbytes)

    def complete_all(self) -> None:
        for event in self.events:
            event.completed = True
