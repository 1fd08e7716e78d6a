"""``kvtier demo``: a multi-turn chat workload through kvtier on a Llama model, against full recompute.

Promises:
- Needs no argument and no download: a Llama-architecture model is built from a config with seeded random
  weights (``--model DIR`` loads a local Hugging Face checkpoint instead); token ids are random, as the
  workload needs no tokenizer. ``--device auto`` (the default) runs on CUDA when there is one, in bf16 and
  with a 1B-shaped model and long prompts (where restoring is worth most); else on the CPU in fp32 with a
  small model, about a minute on 2 idle cores.
- The workload: one shared system prompt, several conversations, turns that grow (each turn's prompt is
  the previous prompt, the assistant's reply and a new user message), conversations interleaved.
- The host tier is sized below the workload's KV, so older blocks are demoted to a disk tier in a
  temporary directory (removed at the end; ``--data-dir`` keeps it), and some restores come from disk.
- Each request prints its prompt tokens, the tokens restored and the tiers they came from, the time to
  first token with kvtier and with full recompute, and the contract measured
  (``kvtier_connectors.transformers.contract``): whether the restored KV equals the saved KV
  (``torch.equal``), the max |logit difference| from the recompute ("identical" only for ``torch.equal``),
  whether the top-1 token agrees, and whether greedy continuations of ``--continue-tokens`` agree.
- Exit status 0 when the contract held for every request (KV identical, logits within the dtype's
  tolerance, top-1 agreeing), 1 otherwise: a criterion that holds on every CPU and GPU, whatever its
  kernels. The last line states the speedup and where the restored blocks came from.
- ``--attn kvtier_exact`` (opt-in) first checks on this machine whether that attention makes restores
  bit-exact (``exact.verify``) and says so; the exit status follows the contract either way.
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
from transformers import DynamicCache

from kvtier import ConfigError, DiskConfig, Store, StoreConfig, Tier
from kvtier.config import MiB
from kvtier_connectors.transformers.adapter import TransformersConnector, cache_kwarg, kv_layout
from kvtier_connectors.transformers.contract import (
    RTOL,
    Agreement,
    RecordingStore,
    compare_logits,
    greedy_continuation,
    restored_kv_identical,
)
from kvtier_connectors.transformers.exact import NAME as EXACT_ATTENTION
from kvtier_connectors.transformers.exact import register, verify
from kvtier_connectors.transformers.models import load_model, random_model

HELP = "run a multi-turn chat workload through kvtier on a small model and compare with full recompute"

# The CPU model: Llama-shaped, about 20M parameters, so the whole demo takes about a minute on 2 idle
# CPU cores (under 3 with other work running) while a long prompt still takes long enough to prefill
# that restoring it shows.
DEMO_MODEL = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096}
# The GPU model: Llama-3.2-1B-shaped (a GPU prefills the small one in milliseconds, too fast to matter).
DEMO_MODEL_CUDA = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 16384,
                   "tie_word_embeddings": True}
# System prompt tokens per device: long enough on each that a restore saves real time.
SYSTEM_TOKENS = {"cpu": 384, "cuda": 8192}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face checkpoint (default: a random Llama)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--attn", default="sdpa",
                        help=f"attention implementation (sdpa, eager, or {EXACT_ATTENTION}: opt-in, checked for "
                             "bit-exactness on this machine first)")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-tokens", type=int,
                        help=f"tokens of the shared system prompt (default {SYSTEM_TOKENS['cpu']} on the CPU, "
                             f"{SYSTEM_TOKENS['cuda']} on CUDA)")
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--host-blocks", type=int,
                        help="host tier capacity in blocks (default: two thirds of the workload's, so that some "
                             "go to disk)")
    parser.add_argument("--continue-tokens", type=int, default=4,
                        help="greedy tokens decoded after each prompt, with kvtier's cache and the recompute's")
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
    kv_identical: bool  # restored KV equals the saved KV (vacuously true when nothing was restored)
    agreement: Agreement
    greedy_agree: bool

    @property
    def holds(self) -> bool:
        """The contract for this request."""
        return self.kv_identical and self.agreement.within_noise


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is a ``ConfigError``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def synchronize_after_forward(model: Any) -> None:
    """On CUDA, make every forward of ``model`` wait for its kernels, so that wall-clock times are complete."""
    if model.device.type == "cuda":
        model.register_forward_hook(lambda *_: torch.cuda.synchronize(model.device))


def _workload(args: argparse.Namespace, vocab_size: int, system_tokens: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(conversation, turn, prompt)`` in request order: conversations interleaved, each turn growing."""
    generator = torch.Generator().manual_seed(args.seed + 1)

    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (1, count), generator=generator)

    system = draw(system_tokens)
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


def workload_blocks(requests: list[tuple[int, int, torch.Tensor]], system_tokens: int, block_tokens: int) -> int:
    """Distinct whole blocks of the workload: the shared system prompt's, then each conversation's own."""
    shared = system_tokens // block_tokens
    longest: dict[int, int] = {}
    for conversation, _, prompt in requests:
        longest[conversation] = max(longest.get(conversation, 0), prompt.shape[1] // block_tokens)
    return shared + sum(blocks - shared for blocks in longest.values())


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    register()
    if args.model:
        return load_model(args.model, dtype=dtype, attn_implementation=args.attn).to(device)
    shape = DEMO_MODEL_CUDA if device.type == "cuda" else DEMO_MODEL
    return random_model("llama", dtype=dtype, attn_implementation=args.attn, seed=args.seed, device=device, **shape)


def _store_config(config: StoreConfig, args: argparse.Namespace, host_blocks: int, block_bytes: int,
                  data_dir: str) -> StoreConfig:
    host = dataclasses.replace(config.host, capacity_bytes=host_blocks * block_bytes)
    if args.no_disk:
        return dataclasses.replace(config, host=host, disk=DiskConfig())
    # admit_all: the demo wants its demoted blocks on disk at once, not on their second sighting.
    disk_bytes = max(512 * MiB, 4 * host_blocks * block_bytes)
    disk = dataclasses.replace(config.disk, paths=(data_dir,), capacity_bytes=disk_bytes,
                               region_bytes=max(4 * MiB, 4 * block_bytes), admission="admit_all")
    return dataclasses.replace(config, host=host, disk=disk)


def _warm_up(model: Any, vocab_size: int) -> None:
    """One short prefill and one cached tail forward, so that kernel set-up is not charged to request 1."""
    ids = torch.randint(0, vocab_size, (1, 48), generator=torch.Generator().manual_seed(0)).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :32], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        model(ids[:, 32:], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})


def serve_request(connector: TransformersConnector, recorder: RecordingStore, model: Any, prompt: torch.Tensor,
                  continue_tokens: int) -> tuple[Any, float, bool, Agreement, bool]:
    """One request through kvtier and as a full recompute: ``(prefill, recompute_s, kv, logits, greedy)``."""
    result = connector.prefill(prompt, logits_to_keep=1)
    kv_identical = restored_kv_identical(result.cache, connector.layout, connector.block_keys(prompt)[0],
                                         result.restored_tokens, recorder.saved)
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    with torch.no_grad():
        full = model(prompt, logits_to_keep=1, use_cache=True, **{connector.cache_kwarg: cache}).logits[:, -1]
    recompute_s = time.perf_counter() - started
    logits = result.logits[:, -1]
    agreement = compare_logits(logits, full, model.dtype)
    greedy = (greedy_continuation(model, result.cache, logits, continue_tokens)
              == greedy_continuation(model, cache, full, continue_tokens))
    return result, recompute_s, kv_identical, agreement, greedy


def _serve(connector: TransformersConnector, recorder: RecordingStore, model: Any,
           requests: list[tuple[int, int, torch.Tensor]], continue_tokens: int) -> list[Row]:
    rows = []
    for conversation, turn, prompt in requests:
        prompt = prompt.to(model.device)
        result, recompute_s, kv, agreement, greedy = serve_request(connector, recorder, model, prompt,
                                                                   continue_tokens)
        rows.append(Row(conversation, turn, prompt.shape[1], result.restored_tokens, result.tiers.count(Tier.HOST),
                        result.tiers.count(Tier.DISK), result.ttft_s, recompute_s, kv, agreement, greedy))
        _print_row(len(rows), rows[-1])
    return rows


def _print_row(index: int, row: Row) -> None:
    tiers = f"host {row.host_blocks:3d} + disk {row.disk_blocks:3d}"
    speedup = row.ttft_recompute_s / row.ttft_kvtier_s
    kv = "-" if not row.restored_tokens else ("equal" if row.kv_identical else "DIFFER")
    agreement = row.agreement
    diff = "identical" if agreement.logits_identical else f"{agreement.max_abs_logit_diff:.1e}"
    print(f"{index:4d} {row.conversation:5d} {row.turn + 1:5d} {row.prompt_tokens:7d} {row.restored_tokens:9d}  "
          f"{tiers:22s} {row.ttft_kvtier_s * 1e3:10.1f} {row.ttft_recompute_s * 1e3:10.1f} {speedup:8.1f}x  "
          f"{kv:>8} {diff:>12} {'yes' if agreement.top1_agree else 'no':>6} {'yes' if row.greedy_agree else 'no':>7}"
          f"{'' if row.holds else '  CONTRACT VIOLATED'}", flush=True)


def _exactness_note(args: argparse.Namespace, model: Any) -> None:
    if args.attn != EXACT_ATTENTION:
        return
    if verify(model, seed=args.seed):
        print(f"{EXACT_ATTENTION}: verified bit-exact on this machine (prefix + tail forwards equal a whole one)")
    else:
        print(f"{EXACT_ATTENTION}: NOT bit-exact on this machine (its GEMMs give other bits to other row counts); "
              "the contract below still applies")


def _summarize(rows: list[Row], dtype: torch.dtype, device: torch.device, demoted: int, elapsed_s: float) -> bool:
    restores = [row for row in rows if row.restored_tokens]
    holds = [row.holds for row in rows]
    worst = max(row.agreement.max_abs_logit_diff for row in rows)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"contract: restored KV equal to the saved KV (torch.equal) in {sum(r.kv_identical for r in restores)}/"
          f"{len(restores)} restores; first-token logits within the {dtype_name} tolerance "
          f"({RTOL.get(dtype, RTOL[torch.bfloat16]):g} x max |logit|) in "
          f"{sum(r.agreement.within_noise for r in rows)}/{len(rows)}, identical in "
          f"{sum(r.agreement.logits_identical for r in rows)}/{len(rows)}, max |difference| {worst:.1e}; "
          f"top-1 agrees in {sum(r.agreement.top1_agree for r in rows)}/{len(rows)}; greedy continuations agree "
          f"in {sum(r.greedy_agree for r in rows)}/{len(rows)}: {'held' if all(holds) else 'VIOLATED'}")
    prompt_tokens = sum(row.prompt_tokens for row in rows)
    restored_tokens = sum(row.restored_tokens for row in rows)
    kvtier_s = sum(row.ttft_kvtier_s for row in rows)
    recompute_s = sum(row.ttft_recompute_s for row in rows)
    print(f"kvtier on {device.type} ({dtype_name}): TTFT {kvtier_s:.2f} s vs {recompute_s:.2f} s recompute, "
          f"{recompute_s / kvtier_s:.1f}x faster over {len(rows)} requests; {restored_tokens}/{prompt_tokens} "
          f"prompt tokens restored ({restored_tokens / prompt_tokens:.0%}), "
          f"{sum(r.host_blocks for r in rows)} blocks from the host tier and {sum(r.disk_blocks for r in rows)} "
          f"from the disk tier ({demoted} demoted there); {elapsed_s:.0f} s in all")
    return all(holds)


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    started = time.perf_counter()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = _model(args, device, dtype)
    synchronize_after_forward(model)
    _exactness_note(args, model)
    vocab_size = int(model.config.vocab_size)
    _warm_up(model, vocab_size)
    layout = kv_layout(model, args.block_tokens)
    system_tokens = args.system_tokens or SYSTEM_TOKENS[device.type]
    requests = _workload(args, vocab_size, system_tokens)
    host_blocks = args.host_blocks or max(system_tokens // args.block_tokens + 1,
                                          2 * workload_blocks(requests, system_tokens, args.block_tokens) // 3)
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as temp_dir:
        store_config = _store_config(config, args, host_blocks, layout.block_bytes, args.data_dir or temp_dir)
        with Store(layout, store_config) as store:
            recorder = RecordingStore(store)
            connector = TransformersConnector(model, recorder)
            disk = f"disk tier in {store_config.disk.paths[0]}" if store_config.disk.paths else "no disk tier"
            print(f"model {connector.model_id} on {device.type} ({str(dtype).removeprefix('torch.')}, attention "
                  f"{args.attn}); {layout.block_tokens}-token blocks of {layout.block_bytes / 2**20:.2f} MiB; "
                  f"host tier {host_blocks} blocks, {disk}")
            print(f"{'req':>4} {'conv':>5} {'turn':>5} {'prompt':>7} {'restored':>9}  {'restored from':22s} "
                  f"{'ttft kvtier ms':>10} {'recompute ms':>10} {'speedup':>8}  {'KV':>8} {'max|dlogit|':>12} "
                  f"{'top-1':>6} {'greedy':>7}")
            rows = _serve(connector, recorder, model, requests, args.continue_tokens)
            demoted = int(store.stats().tiers["host"].detail["demoted_blocks"])
    held = _summarize(rows, dtype, device, demoted, time.perf_counter() - started)
    return 0 if held else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier demo", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
