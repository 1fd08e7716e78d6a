from __future__ import annotations

import threading

import pytest
import torch

from kvtier import ClosedError, ConfigError, InvalidInputError, TransferConfig
from kvtier.transfer import CpuTransferEngine, Direction, TransferEngine, make_transfer_engine


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
