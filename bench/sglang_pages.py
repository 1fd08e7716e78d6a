"""How fast the SGLang backend moves pages, against a raw copy of the same bytes measured in the same run.

``python bench/sglang_pages.py [--json]`` in make test-sglang's environment (it builds SGLang's real
``MHATokenToKVPoolHost`` on the CPU with the tests' helper). It times ``batch_set_v1`` (host pool -> kvtier)
and ``batch_get_v1`` (kvtier -> host pool) of ``--pages`` pages on an embedded store, and two baselines over
the same pages: the same per-page copies into a plain buffer without kvtier (``raw_pages``), and one flat
copy of as many bytes (``memcpy``). Medians of ``--repeat`` runs; one summary line, or one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "connectors"))
import sglang_pools as sp


def median_s(works: dict[str, Callable[[int], object]], repeat: int) -> dict[str, float]:
    """The median seconds of each work; every round runs each once, so that all see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in works}
    for run in range(repeat):
        for name, work in works.items():
            start = time.perf_counter()
            work(run)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="page_first", choices=sp.HOST_LAYOUTS)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = args.pages * args.page_tokens
    pool = sp.mha_pool(args.layout, dtype=torch.bfloat16, layers=args.layers, heads=args.heads,
                       head_dim=args.head_dim, page_tokens=args.page_tokens, device_tokens=tokens)
    written, read = pool.alloc(tokens), pool.alloc(tokens)
    pool.kv_buffer.view(torch.int16).random_()
    page_bytes = pool.page_size * pool.get_size_per_token()
    backend = sp.open_backend(pool, config={"host": {"capacity_bytes": 2 * args.pages * page_bytes + (64 << 20),
                                                     "policy": "lru", "pin": False},
                                            "transfer": {"backend": "cpu"}})
    prompts = [sp.page_hashes(args.pages, first_token=run * tokens) for run in range(args.repeat + 1)]
    assert backend.batch_set_v1(prompts[-1], written) == [True] * args.pages
    pages = backend.pages
    staging = torch.zeros((args.pages, *pages.block_shape), dtype=torch.bfloat16)
    starts = pages.page_starts(written, args.pages)
    flat = staging.view(-1)
    source = pool.kv_buffer.view(-1)[: flat.numel()]
    seconds = median_s({
        "set": lambda run: backend.batch_set_v1(prompts[run], written),
        "get": lambda run: backend.batch_get_v1(prompts[-1], read),
        "raw": lambda run: [staging[i].copy_(pages.view(start)) for i, start in enumerate(starts)],
        "memcpy": lambda run: flat.copy_(source),
    }, args.repeat)
    set_s, get_s, raw_s, memcpy_s = seconds["set"], seconds["get"], seconds["raw"], seconds["memcpy"]
    backend.close()
    batch_bytes = args.pages * page_bytes
    record = {"layout": args.layout, "pages": args.pages, "page_bytes": page_bytes, "threads": torch.get_num_threads(),
              "set_gb_s": batch_bytes / set_s / 1e9, "get_gb_s": batch_bytes / get_s / 1e9,
              "raw_pages_gb_s": batch_bytes / raw_s / 1e9, "memcpy_gb_s": batch_bytes / memcpy_s / 1e9,
              "set_vs_raw_pages": raw_s / set_s, "get_vs_raw_pages": raw_s / get_s,
              "set_vs_memcpy": memcpy_s / set_s, "get_vs_memcpy": memcpy_s / get_s}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"sglang {args.layout}: {args.pages} pages of {page_bytes >> 10} KiB: set {record['set_gb_s']:.2f} GB/s "
              f"({record['set_vs_raw_pages']:.2f}x raw pages, {record['set_vs_memcpy']:.2f}x memcpy), get "
              f"{record['get_gb_s']:.2f} GB/s ({record['get_vs_raw_pages']:.2f}x raw pages, "
              f"{record['get_vs_memcpy']:.2f}x memcpy); raw pages {record['raw_pages_gb_s']:.2f} GB/s, memcpy "
              f"{record['memcpy_gb_s']:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
