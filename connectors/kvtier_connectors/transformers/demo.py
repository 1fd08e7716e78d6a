"""``kvtier demo``: a multi-turn chat workload through kvtier on a small Llama model, against full recompute.

Promises:
- Needs no argument and no download: a Llama-architecture model is built from a config with seeded random
  weights (``--model DIR`` loads a local Hugging Face checkpoint instead); token ids are random, as the
  workload needs no tokenizer.
- The workload: one shared system prompt, several conversations, turns that grow (each turn's prompt is
  the previous prompt, the assistant's reply and a new user message), conversations interleaved.
- The host tier is sized below the workload's KV, so older blocks are demoted to a disk tier in a
  temporary directory (removed at the end; ``--data-dir`` keeps it), and some restores come from disk.
- Each request prints its prompt tokens, the tokens restored and the tiers they came from, the time to
  first token with kvtier and with full recompute, and whether the first token's logits are identical
  (``torch.equal``) to the full recompute's. A final line sums it up. Exit status 0 when every request
  was identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvtier import DiskConfig, Store, StoreConfig, Tier
from kvtier.config import MiB
from kvtier_connectors.transformers.adapter import TransformersConnector, kv_layout
from kvtier_connectors.transformers.exact import NAME as EXACT_ATTENTION
from kvtier_connectors.transformers.exact import register
from kvtier_connectors.transformers.models import load_model, random_model

HELP = "run a multi-turn chat workload through kvtier on a small model and compare with full recompute"

# The demo model: Llama-shaped, about 20M parameters, so the whole demo takes about a minute on 2 idle
# CPU cores (under 3 with other work running) while a long prompt still takes long enough to prefill
# that restoring it shows.
DEMO_MODEL = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face checkpoint (default: a random Llama)")
    parser.add_argument("--attn", default=EXACT_ATTENTION,
                        help=f"attention implementation (default {EXACT_ATTENTION}: bit-identical across prompt "
                             "lengths in fp32; sdpa and eager are close but not always identical there)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=384, help="tokens of the shared system prompt")
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--host-blocks", type=int, default=40,
                        help="host tier capacity in blocks (below the workload, so that some go to disk)")
    parser.add_argument("--data-dir", help="disk tier directory (default: a temporary one, removed at the end)")
    parser.add_argument("--no-disk", action="store_true", help="host tier only")
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Row:
    conversation: int
    turn: int
    prompt_tokens: int
    restored_tokens: int
    host_blocks: int
    disk_blocks: int
    ttft_kvtier_s: float
    ttft_recompute_s: float
    identical: bool


def _workload(args: argparse.Namespace, vocab_size: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(conversation, turn, prompt)`` in request order: conversations interleaved, each turn growing."""
    generator = torch.Generator().manual_seed(args.seed + 1)

    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (1, count), generator=generator)

    system = draw(args.system_tokens)
    prompts = [system for _ in range(args.conversations)]
    requests = []
    for turn in range(args.turns):
        for conversation in range(args.conversations):
            # The assistant's reply (random: the model's words mean nothing) joins the history before the
            # next user message.
            reply = draw(48) if turn else draw(0)
            user = draw(80 + 24 * ((conversation + turn) % 3))
            prompts[conversation] = torch.cat([prompts[conversation], reply, user], dim=1)
            requests.append((conversation, turn, prompts[conversation]))
    return requests


def _model(args: argparse.Namespace) -> Any:
    dtype = getattr(torch, args.dtype)
    register()
    if args.model:
        return load_model(args.model, dtype=dtype, attn_implementation=args.attn)
    return random_model("llama", dtype=dtype, attn_implementation=args.attn, seed=args.seed, **DEMO_MODEL)


def _store_config(config: StoreConfig, args: argparse.Namespace, block_bytes: int, data_dir: str) -> StoreConfig:
    host = dataclasses.replace(config.host, capacity_bytes=args.host_blocks * block_bytes)
    if args.no_disk:
        return dataclasses.replace(config, host=host, disk=DiskConfig())
    # admit_all: the demo wants its demoted blocks on disk at once, not on their second sighting.
    disk = dataclasses.replace(config.disk, paths=(data_dir,), capacity_bytes=512 * MiB, region_bytes=4 * MiB,
                               admission="admit_all")
    return dataclasses.replace(config, host=host, disk=disk)


def _serve(connector: TransformersConnector, model: Any, requests: list[tuple[int, int, torch.Tensor]]) -> list[Row]:
    rows = []
    for conversation, turn, prompt in requests:
        result = connector.prefill(prompt, logits_to_keep=1)
        started = time.perf_counter()
        with torch.no_grad():
            full = model(prompt, logits_to_keep=1).logits[:, -1]
        recompute_s = time.perf_counter() - started
        rows.append(Row(conversation, turn, prompt.shape[1], result.restored_tokens, result.tiers.count(Tier.HOST),
                        result.tiers.count(Tier.DISK), result.ttft_s, recompute_s,
                        torch.equal(result.logits[:, -1], full)))
        _print_row(len(rows), rows[-1])
    return rows


def _print_row(index: int, row: Row) -> None:
    tiers = f"host {row.host_blocks:2d} + disk {row.disk_blocks:2d}"
    speedup = row.ttft_recompute_s / row.ttft_kvtier_s
    print(f"{index:4d} {row.conversation:5d} {row.turn + 1:5d} {row.prompt_tokens:7d} {row.restored_tokens:9d}  "
          f"{tiers:20s} {row.ttft_kvtier_s * 1e3:12.1f} {row.ttft_recompute_s * 1e3:14.1f} {speedup:8.1f}x  "
          f"{'yes' if row.identical else 'NO'}", flush=True)


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    started = time.perf_counter()
    model = _model(args)
    layout = kv_layout(model, args.block_tokens)
    requests = _workload(args, int(model.config.vocab_size))
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as temp_dir:
        store_config = _store_config(config, args, layout.block_bytes, args.data_dir or temp_dir)
        with Store(layout, store_config) as store:
            connector = TransformersConnector(model, store)
            disk = f"disk tier in {store_config.disk.paths[0]}" if store_config.disk.paths else "no disk tier"
            print(f"model {connector.model_id} ({args.dtype}, attention {args.attn}); {layout.block_tokens}-token "
                  f"blocks of {layout.block_bytes / 2**20:.2f} MiB; host tier {args.host_blocks} blocks, {disk}")
            print(f"{'req':>4} {'conv':>5} {'turn':>5} {'prompt':>7} {'restored':>9}  {'restored from':20s} "
                  f"{'ttft kvtier ms':>12} {'ttft recompute ms':>14} {'speedup':>8}  identical")
            rows = _serve(connector, model, requests)
            demoted = store.stats().tiers["host"].detail["demoted_blocks"]
    prompt_tokens = sum(row.prompt_tokens for row in rows)
    restored_tokens = sum(row.restored_tokens for row in rows)
    kvtier_s = sum(row.ttft_kvtier_s for row in rows)
    recompute_s = sum(row.ttft_recompute_s for row in rows)
    identical = sum(row.identical for row in rows)
    print(f"summary: {len(rows)} requests, {restored_tokens}/{prompt_tokens} prompt tokens restored "
          f"({restored_tokens / prompt_tokens:.0%}; blocks from host {sum(r.host_blocks for r in rows)}, "
          f"from disk {sum(r.disk_blocks for r in rows)}; {demoted} demoted to disk), "
          f"TTFT {kvtier_s:.2f} s with kvtier vs {recompute_s:.2f} s recompute ({recompute_s / kvtier_s:.1f}x), "
          f"first-token logits identical in {identical}/{len(rows)} requests, "
          f"{time.perf_counter() - started:.0f} s in all")
    return 0 if identical == len(rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier demo", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
