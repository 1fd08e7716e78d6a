"""How much a concurrent save slows a decode step down (``decode_during_save`` in ``make gpu-check``).

A decode step is stood in for by ``layers`` memory-bound matrix-vector products shaped like a 1B model's
MLP (``[batch, hidden] @ [hidden, 4 hidden] @ [4 hidden, hidden]``, bf16 on CUDA), run on the caller's
stream and timed with CUDA events on that stream (``time.perf_counter`` around a synchronised step on the
CPU). ``decode_alone_ms`` is the median step alone; ``decode_during_save_ms`` the median step while
another thread saves fresh 2 MiB blocks from the device with ``Store.put`` in a loop (the copy engine's
kernels on its low-priority store streams, the arena registered); ``slowdown`` is their ratio (the
target: at most 1.10). ``save_gbps`` says how fast the saves ran meanwhile, so a slowdown bought by
starving the save is visible. On a machine without CUDA the same code runs on the CPU, as the tests do.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch

from kvtier.bench.device import _layout_for
from kvtier.config import HostConfig, StoreConfig, TransferConfig
from kvtier.store import Store

_MiB = 1024 * 1024


def run_decode_during_save(device: str = "cuda", hidden: int = 2048, layers: int = 16, batch: int = 8,
                           steps: int = 50, save_blocks: int = 64, block_bytes: int = 2 * _MiB) -> dict[str, object]:
    """Median decode-step time alone and during a concurrent save loop, and their ratio."""
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    torch.manual_seed(0)
    weights = [(torch.randn(hidden, 4 * hidden, device=dev, dtype=dtype),
                torch.randn(4 * hidden, hidden, device=dev, dtype=dtype)) for _ in range(layers)]
    x = torch.randn(batch, hidden, device=dev, dtype=dtype)

    def step() -> None:
        h = x
        for up, down in weights:
            h = torch.nn.functional.gelu(h @ up) @ down
            h = h / (h.norm() + 1)

    timed = _cuda_timer(step, dev) if on_cuda else _cpu_timer(step)
    for _ in range(3):
        timed()
    alone = statistics.median(timed() for _ in range(steps))

    layout = _layout_for(block_bytes)
    config = StoreConfig(host=HostConfig(capacity_bytes=2 * save_blocks * (layout.block_bytes + 4096), policy="lru"),
                         transfer=TransferConfig(backend="cuda" if on_cuda else "cpu"))
    blocks = [torch.randn(layout.block_shape, device=dev, dtype=layout.torch_dtype) for _ in range(save_blocks)]
    stop = threading.Event()
    saved = [0]
    with Store(layout, config) as store:
        if on_cuda:
            store.pin_for(dev)
            store.arena.wait_pinned(120)
        hasher = store.hasher("bench-decode")

        def save_loop() -> None:
            round_index = 0
            while not stop.is_set():
                round_index += 1
                keys = hasher.keys([round_index] * (save_blocks * layout.block_tokens))
                if store.put(keys, blocks).wait(120).ok:
                    saved[0] += save_blocks * layout.block_bytes

        saver = threading.Thread(target=save_loop, name="kvtier-bench-save", daemon=True)
        started = time.perf_counter()
        saver.start()
        during = statistics.median(timed() for _ in range(steps))
        stop.set()
        saver.join(120)
        save_s = time.perf_counter() - started
    return {
        "benchmark": "decode_during_save",
        "device": torch.cuda.get_device_name(dev) if on_cuda else "cpu",
        "hidden": hidden, "layers": layers, "batch": batch, "steps": steps,
        "decode_alone_ms": round(alone * 1e3, 3),
        "decode_during_save_ms": round(during * 1e3, 3),
        "slowdown": round(during / alone, 3) if alone > 0 else None,
        "save_gbps": round(saved[0] / save_s / 1e9, 3) if save_s > 0 else 0.0,
        "unix_time": int(time.time()),
    }


def _cuda_timer(step: Callable[[], None], dev: torch.device) -> Callable[[], float]:
    def run() -> float:
        stream = torch.cuda.current_stream(dev)
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        begin.record(stream)
        step()
        end.record(stream)
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3

    return run


def _cpu_timer(step: Callable[[], None]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    return run
