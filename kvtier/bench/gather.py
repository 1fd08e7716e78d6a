"""``kvtier bench gather``: gather/scatter of paged KV against a contiguous copy of the same bytes.

The paged cache has the shape of Llama-3.1-8B's KV in vLLM (by default 32 layers, 8 KV heads, head_dim 128,
bf16, 16-token pages: 64 KiB a layer page, 2 MiB a block of all layers), one layer-compact tensor per layer.
A fixed-seed random set of block ids is gathered into one staging buffer (chunk, layer, page order, what
the vLLM connector does on a save) and scattered back (a restore). The baseline is one contiguous copy of
the same number of bytes between the same two memories, in the same run, interleaved round by round. On a
GPU the cache lives in device memory, the staging buffer in pinned host memory, and the CUDA kernel of
native/ moves the pages; on the CPU the NumPy fallback does, and the generic torch fallback (what a GPU
without CuPy uses) is measured too. The in-place form is measured in the same rounds (``slots_*``): the
same pages gathered straight into shuffled slots of a host arena (registered on a GPU, waited for before
timing) and scattered back from them, as the connectors do. Prints one JSON object (``--json``) or a short
table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from kvtier.arena import PAGE_BYTES, HostArena, round_up
from kvtier.bench.common import gbps, median_seconds
from kvtier.config import StoreConfig
from kvtier.native import PagedKV, byte_rows

HELP = "gather/scatter of paged KV (CUDA kernel or torch fallback) GB/s vs a contiguous copy of the same bytes"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_gather_bench(num_layers: int = 32, num_kv_heads: int = 8, head_dim: int = 128, page_tokens: int = 16,
                     dtype: torch.dtype = torch.bfloat16, cache_blocks: int = 512, gather_blocks: int = 128,
                     pages_per_chunk: int = 1, repeats: int = 7, device: str = "auto",
                     seed: int = 0) -> dict[str, object]:
    """Gather and scatter ``gather_blocks`` random pages of every layer; GB/s against a contiguous copy."""
    dev = _device(device)
    item = torch.empty(0, dtype=dtype).element_size()
    page_bytes = 2 * num_kv_heads * page_tokens * head_dim * item
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randint(0, 256, (num_layers, cache_blocks, page_bytes), dtype=torch.uint8,
                          generator=generator).to(dev)
    layers = [cache[layer].view(dtype).view(cache_blocks, num_kv_heads, page_tokens, 2 * head_dim)
              for layer in range(num_layers)]
    paged = PagedKV([byte_rows(layer, cache_blocks) for layer in layers])
    block_ids = torch.randperm(cache_blocks, generator=generator)[:gather_blocks].tolist()
    moved = gather_blocks * num_layers * page_bytes
    pinned = dev.type == "cuda"
    staging = torch.empty(moved, dtype=torch.uint8, pin_memory=pinned)
    contiguous_src = cache.view(-1)[:moved]

    def timed(op: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            op()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return run

    gather = timed(lambda: paged.gather(block_ids, staging, pages_per_chunk))
    scatter = timed(lambda: paged.scatter(block_ids, staging, pages_per_chunk))
    copy_out = timed(lambda: staging.copy_(contiguous_src, non_blocking=pinned))
    copy_in = timed(lambda: contiguous_src.copy_(staging, non_blocking=pinned))
    num_chunks = gather_blocks // pages_per_chunk
    arena = HostArena(2 * num_chunks, round_up(paged.chunk_bytes(pages_per_chunk), PAGE_BYTES))
    if pinned:
        arena.start_pinning(256 * 1024 * 1024, dev)
        arena.wait_pinned()
    rows = arena.rows()
    slot_ids = torch.randperm(2 * num_chunks, generator=generator)[:num_chunks].tolist()
    ops = {"copy_out": copy_out, "gather": gather, "copy_in": copy_in, "scatter": scatter,
           "slots_gather": timed(lambda: paged.gather_to_slots(block_ids, rows, slot_ids, pages_per_chunk)),
           "slots_scatter": timed(lambda: paged.scatter_from_slots(block_ids, rows, slot_ids, pages_per_chunk))}
    if paged.backend == "numpy":
        # The generic torch path too, which a GPU without CuPy would use, on the same bytes.
        torch_paged = PagedKV(paged.segments, use_numpy=False)
        ops["torch_gather"] = timed(lambda: torch_paged.gather(block_ids, staging, pages_per_chunk))
        ops["torch_scatter"] = timed(lambda: torch_paged.scatter(block_ids, staging, pages_per_chunk))
    for op in ops.values():  # warm up: page faults, kernel compilation
        op()
    # Interleaved, one run of each per round, so that a load change on a shared machine hits every figure alike.
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            times[name].append(median_seconds(op, 1))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    arena.close()
    copy_out_s, gather_s, copy_in_s, scatter_s = (seconds[n] for n in ("copy_out", "gather", "copy_in", "scatter"))
    result: dict[str, object] = {
        "benchmark": "gather",
        "backend": paged.backend,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "layout": {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
                   "page_tokens": page_tokens, "dtype": str(dtype).removeprefix("torch.")},
        "page_bytes": page_bytes,
        "cache_blocks": cache_blocks,
        "gather_blocks": gather_blocks,
        "pages_per_chunk": pages_per_chunk,
        "bytes_moved": moved,
        "repeats": repeats,
        "gather_gbps": gbps(moved, gather_s),
        "scatter_gbps": gbps(moved, scatter_s),
        "contiguous_out_gbps": gbps(moved, copy_out_s),
        "contiguous_in_gbps": gbps(moved, copy_in_s),
    }
    if "torch_gather" in seconds:
        result["torch_gather_gbps"] = gbps(moved, seconds["torch_gather"])
        result["torch_scatter_gbps"] = gbps(moved, seconds["torch_scatter"])
    result["gather_vs_contiguous"] = round(copy_out_s / gather_s, 3)
    result["scatter_vs_contiguous"] = round(copy_in_s / scatter_s, 3)
    result["slots_gather_gbps"] = gbps(moved, seconds["slots_gather"])
    result["slots_scatter_gbps"] = gbps(moved, seconds["slots_scatter"])
    result["slots_gather_vs_contiguous"] = round(copy_out_s / seconds["slots_gather"], 3)
    result["slots_scatter_vs_contiguous"] = round(copy_in_s / seconds["slots_scatter"], 3)
    result["torch_threads"] = torch.get_num_threads()
    result["unix_time"] = int(time.time())
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-tokens", type=int, default=16, help="tokens per engine page (vLLM block)")
    parser.add_argument("--cache-blocks", type=int, default=512, help="blocks in the paged cache (per layer)")
    parser.add_argument("--blocks", type=int, default=128, help="blocks gathered and scattered per repeat")
    parser.add_argument("--pages-per-chunk", type=int, default=1, help="engine pages per kvtier block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    result = run_gather_bench(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                              page_tokens=args.page_tokens, cache_blocks=args.cache_blocks, gather_blocks=args.blocks,
                              pages_per_chunk=args.pages_per_chunk, repeats=args.repeats, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['backend']} on {result['device']}: {result['bytes_moved']} B in pages of {result['page_bytes']} B")
    print(f"gather  {result['gather_gbps']:>8} GB/s  contiguous {result['contiguous_out_gbps']:>8} GB/s  "
          f"ratio {result['gather_vs_contiguous']}")
    print(f"scatter {result['scatter_gbps']:>8} GB/s  contiguous {result['contiguous_in_gbps']:>8} GB/s  "
          f"ratio {result['scatter_vs_contiguous']}")
    print(f"in place: gather to slots {result['slots_gather_gbps']} GB/s "
          f"(ratio {result['slots_gather_vs_contiguous']}), scatter from slots "
          f"{result['slots_scatter_gbps']} GB/s (ratio {result['slots_scatter_vs_contiguous']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/gather.py``: parse ``argv`` and run with the default store configuration."""
    parser = argparse.ArgumentParser(description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())
