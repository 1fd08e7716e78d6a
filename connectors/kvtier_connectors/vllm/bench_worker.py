"""The vLLM worker's data path against raw copies of the same bytes, without vLLM importable.

``python -m kvtier_connectors.vllm.bench_worker [--device auto|cpu|cuda] [--chunks 32,64,128,256] [--json]``

Drives ``WorkerSide`` (the connector's worker side) with Llama-3.1-8B-shaped pages: 32 layers of 16-token
bf16 pages with 8 KV heads of 128 (64 KiB per layer and block), one kvtier chunk = one vLLM block of every
layer (2 MiB), in vLLM 0.33's block-outermost layout (one tensor, blocks outermost, layers inside).

Promises:
- For each chunk count: a save (``wait_for_save`` of a step whose forward handed over no layer, as in a
  full-graph replay, then until every reserved slot is committed) and a synchronous load
  (``start_load_kv`` until the scatter ran) are timed, median of ``--repeats``; the same run times the raw
  baseline of the same bytes: pinned device-to-host / host-to-device ``copy_`` on CUDA, ``memcpy``
  (``numpy.copyto``) on the CPU. Ratios are worker / raw.
- The loaded pages are checked byte for byte against the saved ones (``torch.equal``), and every save is
  checked to have been committed (``saves_all_finished``); a failed check makes the exit status 1.
- The arena is touched before timing (steady state, not first-touch page faults).
- ``--json`` prints one JSON object and nothing else on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtier.bench.common import gbps
from kvtier.config import HostConfig, StoreConfig
from kvtier.layout import KVLayout
from kvtier.store import Store
from kvtier_connectors.vllm.settings import ChunkKeys, ConnectorSettings, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec, StepPlan, Verdict
from kvtier_connectors.vllm.worker import WorkerSide

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_TOKENS = 32, 8, 128, 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(run: Callable[[], object], repeats: int, device: torch.device,
            setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _raw(num_bytes: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of the raw device-to-host and host-to-device copies (memcpy twice on the CPU)."""
    if device.type == "cuda":
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        save = _median(lambda: host.copy_(dev, non_blocking=True), repeats, device)
        load = _median(lambda: dev.copy_(host, non_blocking=True), repeats, device)
        return save, load
    src, dst = np.ones(num_bytes, dtype=np.uint8), np.empty(num_bytes, dtype=np.uint8)
    seconds = _median(lambda: np.copyto(dst, src), repeats, device)
    return seconds, seconds


def run(device: torch.device, chunk_counts: list[int], repeats: int) -> dict[str, Any]:
    layout = KVLayout(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16",
                      block_tokens=BLOCK_TOKENS)
    most = max(chunk_counts)
    num_blocks = 2 * most
    layer_names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS))
    geometry = VllmGeometry(layer_names, BLOCK_TOKENS, BLOCK_TOKENS, num_blocks, "BLNHC")
    # vLLM 0.33 block-outermost: (blocks, layers, heads, tokens, 2 * head_dim), one layer a strided view.
    kv = torch.empty(num_blocks, NUM_LAYERS, NUM_KV_HEADS, BLOCK_TOKENS, 2 * HEAD_DIM, dtype=torch.bfloat16,
                     device=device)
    kv.view(torch.int16).random_(-30000, 30000)
    caches = {name: kv[:, i] for i, name in enumerate(layer_names)}
    store = Store(layout, StoreConfig(host=HostConfig(capacity_bytes=2 * most * layout.block_bytes,
                                                      policy="lru")))
    store.pin_for(torch.device(device))
    store.arena.wait_pinned()
    # Steady state: the arena's pages are touched (a fresh arena's first fill is the store's own benchmark).
    store.slot_rows().zero_()
    keys = ChunkKeys(ConnectorSettings(model_id="bench-llama-3.1-8b"), layout, geometry)
    worker = WorkerSide(layout, geometry, store, keys)
    worker.register_kv_caches(caches)
    results: list[dict[str, Any]] = []
    checks_ok = True
    rounds = iter(range(1 << 30))
    try:
        for count in chunk_counts:
            num_bytes = count * layout.block_bytes
            source, target = list(range(count)), list(range(most, most + count))
            specs: list[tuple[bytes, ...]] = []

            def new_save(count: int = count, specs: list[tuple[bytes, ...]] = specs) -> None:
                round_id = next(rounds)
                specs.append(tuple(hashlib.sha256(f"{count}:{round_id}:{c}".encode()).digest()
                                   for c in range(count)))

            def save(source: list[int] = source, specs: list[tuple[bytes, ...]] = specs) -> None:
                worker.wait_for_save(StepPlan(saves=[SaveSpec("bench", specs[-1], tuple(source))]))
                worker.settle([Verdict(0)])  # the scheduler side's verdict: nothing failed under the save
                while worker.pending_copies():
                    worker.poll()

            save_s = _median(save, repeats, device, setup=new_save)
            committed = store.lookup(keys.keys(specs[-1]), prefetch=False).num_blocks
            load_plan = StepPlan(loads=[LoadSpec("bench", specs[-1], tuple(target), 0, False)])

            def load(plan: StepPlan = load_plan) -> None:
                worker.start_load_kv(plan)

            load_s = _median(load, repeats, device)
            worker.poll()
            same = bool(torch.equal(kv[target].view(torch.int16), kv[source].view(torch.int16)))
            errors = worker.get_block_ids_with_load_errors()
            raw_save_s, raw_load_s = _raw(num_bytes, device, repeats)
            ok = same and not errors and committed == count
            checks_ok = checks_ok and ok
            results.append({
                "chunks": count, "bytes": num_bytes,
                "save_gbps": gbps(num_bytes, save_s), "raw_save_gbps": gbps(num_bytes, raw_save_s),
                "save_ratio": round(raw_save_s / save_s, 3),
                "load_gbps": gbps(num_bytes, load_s), "raw_load_gbps": gbps(num_bytes, raw_load_s),
                "load_ratio": round(raw_load_s / load_s, 3),
                "saves_all_finished": committed == count, "load_identical": same, "load_errors": len(errors),
            })
    finally:
        worker.shutdown()
        store.close()
    backend = worker.paged.backend if worker.paged is not None else "none"
    return {
        "bench": "vllm_worker", "device": str(device), "backend": backend, "repeats": repeats,
        "page_bytes": layout.block_bytes // NUM_LAYERS, "chunk_bytes": layout.block_bytes,
        "baseline": "pinned copy_" if device.type == "cuda" else "memcpy (numpy.copyto)",
        "fallbacks": worker.paged.fallbacks if worker.paged is not None else 0,
        "results": results, "ok": checks_ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier_connectors.vllm.bench_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--chunks", default="32,64,128,256", help="comma-separated chunk counts (2 MiB each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        chunk_counts = [int(part) for part in args.chunks.split(",") if part]
    except ValueError:
        parser.error(f"--chunks takes comma-separated integers, got {args.chunks!r}")
    if not chunk_counts or min(chunk_counts) <= 0 or args.repeats <= 0:
        parser.error("--chunks and --repeats must be positive")
    report = run(torch.device(name), chunk_counts, args.repeats)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"vLLM worker, {report['device']} ({report['backend']}), 2 MiB chunks, baseline {report['baseline']}")
        for row in report["results"]:
            print(f"{row['chunks']:>5} chunks: save {row['save_gbps']:7.2f} GB/s ({row['save_ratio']:.2f}x raw), "
                  f"load {row['load_gbps']:7.2f} GB/s ({row['load_ratio']:.2f}x raw), "
                  f"saves finished {row['saves_all_finished']}, identical {row['load_identical']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
