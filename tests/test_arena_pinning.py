"""Where the host arena is registered with CUDA, on a CPU, through a recording stand-in for the CUDA runtime.

The registration runs on the device of the process that copies (never device 0 by default), only once
a copy to or from a GPU asks for it (a store that never copies to a GPU, the daemon's, makes no CUDA
call), and ``close`` synchronises every device it was pinned for before unregistering.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from kvtier import HostConfig, KVLayout, Store, StoreConfig, TransferConfig
from kvtier.arena import HostArena
from kvtier.transfer import CpuTransferEngine, Direction


@dataclass
class FakeRuntime:
    """Records every CUDA call the arena makes, with the calling thread's current device."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    current: dict[int, int] = field(default_factory=dict)  # thread id -> device index
    caller_device: int = 0

    def device_of_thread(self) -> int | None:
        return self.current.get(threading.get_ident())

    def cudaHostRegister(self, pointer: int, length: int, flags: int) -> int:
        self.calls.append(("register", self.device_of_thread(), flags))
        return 0

    def cudaHostUnregister(self, pointer: int) -> int:
        self.calls.append(("unregister", self.device_of_thread()))
        return 0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    fake = FakeRuntime()

    def set_device(index: int) -> None:
        fake.calls.append(("set_device", index))
        fake.current[threading.get_ident()] = index

    class DeviceContext:
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            self.previous = fake.current.get(threading.get_ident())
            fake.current[threading.get_ident()] = self.index

        def __exit__(self, *exc: object) -> None:
            fake.current.pop(threading.get_ident(), None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.caller_device)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: fake.calls.append(("synchronize", index)))
    yield fake


def test_the_arena_registers_on_the_device_of_the_caller(runtime: FakeRuntime) -> None:
    arena = HostArena(8, 4096)
    runtime.caller_device = 3  # a tensor-parallel rank on GPU 3
    arena.start_pinning(8192)
    assert arena.wait_pinned(30) and arena.pinned_devices == {3}
    registers = [call for call in runtime.calls if call[0] == "register"]
    assert len(registers) == 4 and all(device == 3 for _, device, _ in registers)
    assert all(flags & 0x01 and flags & 0x02 for _, _, flags in registers)  # portable and mapped
    arena.start_pinning(8192, torch.device("cuda", 5))  # a second device: recorded, registered once
    assert arena.pinned_devices == {3, 5} and len([c for c in runtime.calls if c[0] == "register"]) == 4
    arena.close()
    synchronized = [call[1] for call in runtime.calls if call[0] == "synchronize"]
    first_unregister = next(i for i, call in enumerate(runtime.calls) if call[0] == "unregister")
    last_synchronize = max(i for i, call in enumerate(runtime.calls) if call[0] == "synchronize")
    assert sorted(synchronized) == [3, 5] and last_synchronize < first_unregister


def test_an_explicit_device_wins_over_the_current_one(runtime: FakeRuntime) -> None:
    arena = HostArena(2, 4096)
    arena.start_pinning(4096, torch.device("cuda", 1))
    assert arena.wait_pinned(30)
    assert {call[1] for call in runtime.calls if call[0] == "register"} == {1}
    arena.close()


def test_a_store_that_copies_only_host_memory_makes_no_cuda_call(runtime: FakeRuntime) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    config = StoreConfig(host=HostConfig(capacity_bytes=8 * 4096), transfer=TransferConfig(backend="cpu"))
    with Store(layout, config, transfer=CpuTransferEngine(1)) as store:
        keys = store.hasher("m").keys(list(range(8)))
        blocks = [torch.randn(layout.block_shape) for _ in keys]
        assert store.put(keys, blocks).wait(30).ok
        assert store.get(keys, [torch.empty(layout.block_shape) for _ in keys]).wait(30).ok
        assert store.arena.pinned_devices == frozenset()
    assert runtime.calls == []


def test_the_daemon_store_copies_on_the_cpu_and_never_pins(runtime: FakeRuntime) -> None:
    from kvtier.daemon.server import Daemon

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    daemon = Daemon(StoreConfig(host=HostConfig(capacity_bytes=8 * 4096)))
    store = daemon.store_for(layout)
    try:
        assert isinstance(store.transfer, CpuTransferEngine)
        done: list[BaseException | None] = []
        rows = store.slot_rows()
        assert store.transfer.submit_blocks(rows, [0], [torch.ones(layout.block_numel)], Direction.STORE,
                                            done.append).wait(30)
        assert done == [None]
    finally:
        store.close()
    assert runtime.calls == []
