"""``kvtier demo`` (store edition): an end-to-end walk through the embedded store on embedded defaults.

It saves the KV blocks of a few prompts that share a system prompt, restores a prefix, shows that the
restored bytes equal what was saved (``torch.equal``), fills the host tier past its capacity to show
eviction, and prints the store's statistics. Needs nothing but the package.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from kvtier.config import StoreConfig
from kvtier.layout import KVLayout
from kvtier.store import Store

HELP = "run a short end-to-end demonstration of the store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-blocks", type=int, default=48, help="host tier size in blocks")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=64, dtype="float32", block_tokens=16)
    config = dataclasses.replace(
        config, host=dataclasses.replace(config.host, capacity_bytes=args.host_blocks * layout.block_bytes))
    generator = torch.Generator().manual_seed(0)
    system_prompt = torch.randint(0, 32000, (256,), generator=generator).tolist()
    with Store(layout, config) as store:
        hasher = store.hasher("demo-model")
        print(f"layout: {layout.num_layers} layers x {layout.num_kv_heads} KV heads x {layout.head_dim} dims, "
              f"{layout.block_tokens} tokens/block = {layout.block_bytes / 2**20:.2f} MiB/block; "
              f"host tier {args.host_blocks} blocks; transfer backend {store.transfer.name}")
        saved: dict[bytes, torch.Tensor] = {}
        print(f"{'request':>8} {'tokens':>7} {'blocks':>7} {'restored':>9} {'saved':>6} {'identical':>10}")
        all_identical = True
        for request in range(6):
            user_turn = torch.randint(0, 32000, (64 + 40 * request,), generator=generator).tolist()
            keys = hasher.keys(system_prompt + user_turn)
            hit = store.lookup(keys).num_blocks
            restored = [torch.empty(layout.block_shape) for _ in range(hit)]
            result = store.get(keys[:hit], restored).wait()
            identical = result.ok and all(torch.equal(r, saved[k]) for r, k in zip(restored, keys, strict=False))
            all_identical &= identical
            # The engine would prefill the rest; here fresh random KV stands in for it.
            fresh = [torch.randn(layout.block_shape, generator=generator) for _ in keys[hit:]]
            saved.update(zip(keys[hit:], fresh, strict=True))
            put = store.put(keys[hit:], fresh).wait()
            print(f"{request:>8} {len(system_prompt + user_turn):>7} {len(keys):>7} {hit:>9} "
                  f"{put.num_succeeded:>6} {identical!s:>10}")
        stats = store.stats()
        host = stats.tiers["host"]
        print(f"lookups {stats.lookups}, hit blocks {stats.hit_blocks}, miss blocks {stats.miss_blocks}, "
              f"put {stats.put_blocks}, evicted {host.evicted_blocks}, host {host.used_blocks}/{host.capacity_blocks}")
        print(f"summary: every restore identical to what was saved: {all_identical}")
    return 0 if all_identical else 1
