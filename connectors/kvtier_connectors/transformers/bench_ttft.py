"""``kvtier bench ttft``: time to first token with a prefix restored from host and from disk, against recompute.

Promises:
- Default: a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads) with seeded random
  weights, built without a download, on ``--device`` (auto: CUDA when there is one) in ``--dtype`` (auto:
  bf16 on CUDA, fp32 on the CPU); 64-token blocks; every size is an option. ``--prompt-tokens 2048,8192``
  runs several prompt lengths in one run.
- Per prompt length, the prompt's KV from a full prefill (``recompute_s``) is saved whole (``save_s``: the
  save after a prefill, not part of TTFT) to a host tier that writes through to a disk tier. Then, per
  source, a prefill through the connector restores all of it but the connector's minimum tail: ``host``
  from the same store, ``disk`` from a store reopened on the same files (host tier empty). Each part of
  TTFT is reported: ``restore_s`` (lookup, disk reads, copies into the cache; on CUDA until the copy
  completed, timed with CUDA events on the forward's stream, not when it was queued), ``tail_forward_s``
  (the forward of the unrestored tail), ``ttft_kvtier_s`` (their sum), with ``restore_gbps`` and its raw
  baseline measured in the same run: a copy of ``kv_bytes`` from host memory to the device (a memcpy on
  the CPU between buffers the CPU caches do not hold, a pinned host-to-device copy on CUDA) for ``host``,
  an O_DIRECT read of a file of ``kv_bytes`` in the disk tier's directory with the tier's I/O threads for
  ``disk``. Every time is the median of ``--repeats`` runs, after one warm-up of the model's kernels.
- Each store is timed as it runs once it has been up a while (as ``bench host`` and ``bench device`` time
  theirs): its arena prefaulted and, on CUDA, registered with the device before its first restore (at most
  ``PREPARE_TIMEOUT_S``). A store opened right before a restore would charge the restore the arena's first
  touch (a page fault per 4 KiB; 0.25 GB/s on a VM that backs memory at its first touch) and, on CUDA,
  copies from memory not yet pinned, neither of which the raw baselines pay. For the same reason the ``disk``
  rows' connectors (one per reopened store) restore into the memory the ``host`` rows' connector used, as an
  engine's connector that outlives a store's restart does, not into memory fresh to the process.
- Each record carries the contract (``kvtier_connectors.transformers.contract``): ``kv_identical``
  (``torch.equal`` of the restored KV with the saved KV), ``max_abs_logit_diff``, ``tolerance``,
  ``top1_agree``, ``logits_identical`` (``torch.equal``) and ``contract_held``. Exit status 0 when the
  contract held in every record.
- ``--json`` prints ``{"benchmark": "ttft", ..., "records": [...]}``, one record per prompt length and source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvtier import DiskConfig, InvalidInputError, Store, StoreConfig
from kvtier.config import MiB
from kvtier_connectors.transformers.adapter import Prefill, TransformersConnector, cache_kwarg, kv_layout
from kvtier_connectors.transformers.contract import compare_logits, kv_prefix_equal
from kvtier_connectors.transformers.demo import resolve_device, resolve_dtype, synchronize_after_forward
from kvtier_connectors.transformers.models import random_model

HELP = "time to first token: restore a long prompt's KV from host and from disk vs recompute it"

_CHUNK_BYTES = 4 * 2**20
# The longest wait for a store's arena to be prefaulted (and pinned, on CUDA) before it is timed.
PREPARE_TIMEOUT_S = 300.0
# Read before each raw host copy: larger than the last-level cache of the machines this runs on.
_EVICT_BYTES = 512 * 2**20


def prompt_lengths(text: str) -> list[int]:
    """``"2048,8192"`` -> ``[2048, 8192]``; each a positive integer."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-tokens expects N[,N...], got {text!r}") from None
    if not lengths or min(lengths) <= 0:
        raise argparse.ArgumentTypeError(f"--prompt-tokens expects positive counts, got {text!r}")
    return lengths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--prompt-tokens", type=prompt_lengths, default=[2048], metavar="N[,N...]")
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--min-tail-tokens", type=int, default=16, help="prompt tokens always recomputed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (medians are reported)")
    parser.add_argument("--data-dir", help="disk tier directory (default: a temporary one, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)


def raw_read_gbps(directory: str, nbytes: int, threads: int, repeats: int = 3) -> float:
    """GB/s of reading a fresh ``nbytes`` file in ``directory`` in 4 MiB chunks, O_DIRECT where supported.

    ``threads`` readers share the chunks (as the disk tier's I/O threads do); the best of ``repeats`` passes
    is the drive's rate, so that a pass slowed by other work on the machine does not lower the baseline.
    """
    num_chunks = max(1, nbytes // _CHUNK_BYTES)
    path = Path(directory) / "raw-read-baseline.bin"
    buffers = [mmap.mmap(-1, _CHUNK_BYTES) for _ in range(threads)]  # page-aligned, as O_DIRECT needs
    try:
        buffers[0].write(os.urandom(_CHUNK_BYTES))
        with path.open("wb") as file:
            for _ in range(num_chunks):
                file.write(buffers[0])
            file.flush()
            os.fsync(file.fileno())
        best = 0.0
        for _ in range(repeats):
            best = max(best, _read_pass(path, num_chunks, buffers))
        return best
    finally:
        path.unlink(missing_ok=True)
        for buffer in buffers:
            buffer.close()


def _read_pass(path: Path, num_chunks: int, buffers: list[mmap.mmap]) -> float:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        # No O_DIRECT on this filesystem: read buffered after asking the kernel to drop the cached pages.
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, num_chunks * _CHUNK_BYTES, os.POSIX_FADV_DONTNEED)
    try:
        def read(worker: int) -> None:
            for chunk in range(worker, num_chunks, len(buffers)):
                os.preadv(fd, [buffers[worker]], chunk * _CHUNK_BYTES)

        started = time.perf_counter()
        with ThreadPoolExecutor(len(buffers)) as pool:
            list(pool.map(read, range(len(buffers))))
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return num_chunks * _CHUNK_BYTES / elapsed / 1e9


def host_copy_gbps(nbytes: int, device: torch.device) -> float:
    """GB/s of one copy of ``nbytes`` from host memory to ``device``, the best of 3 passes.

    On the CPU a memcpy (torch's, on its intra-op threads) between buffers that the CPU caches do not hold
    (a read of ``_EVICT_BYTES`` before each pass), as a restore reads slots written long before into a
    cache the model's forward has since pushed out: without it a prompt whose KV fits in the last-level
    cache would be measured against a cache-to-cache copy (100+ GB/s here for 6 MiB). On CUDA a pinned
    host-to-device copy.
    """
    src = torch.ones(max(1, nbytes // 4), dtype=torch.float32, pin_memory=device.type == "cuda")
    dst = torch.empty(src.shape, dtype=src.dtype, device=device)
    evict = torch.ones(_EVICT_BYTES // 8, dtype=torch.int64) if device.type == "cpu" else None
    best = float("inf")
    for _ in range(3):
        if evict is not None:
            int(evict.sum())
        started = time.perf_counter()
        dst.copy_(src, non_blocking=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return src.numel() * 4 / best / 1e9


def _store_config(config: StoreConfig, kv_bytes: int, data_dir: str) -> StoreConfig:
    host = dataclasses.replace(config.host, capacity_bytes=int(kv_bytes * 1.5) + 2**24)
    # Write-through, so the restart finds every block on disk; admit_all, so the first sighting is written.
    disk = DiskConfig(paths=(data_dir,), capacity_bytes=max(2**30, 4 * kv_bytes), region_bytes=64 * MiB,
                      write_mode="through", admission="admit_all", direct_io=config.disk.direct_io)
    return dataclasses.replace(config, host=host, disk=disk)


def _prepared(store: Store, device: torch.device) -> Store:
    """``store`` once its arena is prefaulted and, on CUDA, registered for ``device`` (see the promises)."""
    store.arena.wait_prepared(PREPARE_TIMEOUT_S)
    if device.type == "cuda":
        store.pin_for(device)
        store.arena.wait_pinned(PREPARE_TIMEOUT_S)
    return store


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    model = random_model("llama", dtype=dtype, attn_implementation=args.attn, seed=args.seed, device=device,
                         vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(4096, *args.prompt_tokens), tie_word_embeddings=True)
    synchronize_after_forward(model)
    return model


def _warm_up(model: Any, vocab_size: int, tail_tokens: int) -> None:
    """A short prefill and a ``tail_tokens`` forward onto its cache: kernel set-up is charged to no figure."""
    ids = torch.randint(0, vocab_size, (1, 64 + tail_tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :64], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        model(ids[:, 64:], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})


def _recompute(model: Any, prompt: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, float]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        started = time.perf_counter()
        logits = model(prompt, logits_to_keep=1, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1]
        return logits, cache, time.perf_counter() - started


def _record(source: str, prefills: list[Prefill], reference: tuple[torch.Tensor, DynamicCache], common: dict[str, Any],
            raw_gbps: float) -> dict[str, Any]:
    # On CUDA a restore's copy runs after its host part returned: timed with CUDA events on the forward's
    # stream, and the tail forward is the rest of the (complete, synchronised) TTFT.
    restores = [p.restore_device_s() for p in prefills]
    restore_s = _median(restores)
    tail_s = _median([p.ttft_s - restore if p.restore_span is not None else p.forward_s
                      for p, restore in zip(prefills, restores, strict=True)])
    ttft_s = _median([p.ttft_s for p in prefills])
    last = prefills[-1]
    kv_bytes = common["kv_bytes_per_token"] * last.restored_tokens
    logits, cache = reference
    agreement = compare_logits(last.logits[:, -1], logits, logits.dtype)
    kv_identical = all(kv_prefix_equal(p.cache, cache, p.restored_tokens) for p in prefills)
    record = {k: v for k, v in common.items() if k != "kv_bytes_per_token"}
    record.update({
        "source": source, "restored_tokens": last.restored_tokens, "tiers": sorted({t.value for t in last.tiers}),
        "kv_bytes": kv_bytes, "ttft_kvtier_s": ttft_s, "restore_s": restore_s, "tail_forward_s": tail_s,
        "restore_gbps": kv_bytes / restore_s / 1e9 if restore_s > 0 else 0.0, "raw_gbps": raw_gbps,
        "restore_vs_raw": (kv_bytes / restore_s / 1e9) / raw_gbps if restore_s > 0 and raw_gbps > 0 else 0.0,
        "speedup": common["recompute_s"] / ttft_s,
        "kv_identical": kv_identical, "max_abs_logit_diff": agreement.max_abs_logit_diff,
        "tolerance": agreement.tolerance, "top1_agree": agreement.top1_agree,
        "logits_identical": agreement.logits_identical,
        "contract_held": kv_identical and agreement.within_noise and last.restored_tokens > 0,
    })
    return record


def _prefills(connector_for: Callable[[], TransformersConnector], prompt: torch.Tensor, repeats: int) -> list[Prefill]:
    return [connector_for().prefill(prompt, logits_to_keep=1) for _ in range(repeats)]


def run_length(args: argparse.Namespace, config: StoreConfig, model: Any, prompt_tokens: int,
               data_dir: str) -> list[dict[str, Any]]:
    """The host and disk records of one prompt length."""
    layout = kv_layout(model, args.block_tokens)
    prompt = torch.randint(0, args.vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    prompt = prompt.to(model.device)
    times = []
    for _ in range(args.repeats):  # only the last run's cache is kept: at 32k tokens one is a GiB
        logits, cache, seconds = _recompute(model, prompt)
        times.append(seconds)
    recompute_s = _median(times)
    reference = (logits, cache)
    kv_bytes_stored = (prompt_tokens // args.block_tokens) * layout.block_bytes
    store_config = _store_config(config, kv_bytes_stored, data_dir)
    common = {"prompt_tokens": prompt_tokens, "device": model.device.type, "dtype": str(model.dtype).split(".")[-1],
              "attn": args.attn, "block_tokens": args.block_tokens, "min_tail_tokens": args.min_tail_tokens,
              "recompute_s": recompute_s, "kv_bytes_per_token": layout.token_bytes, "repeats": args.repeats}
    with _prepared(Store(layout, store_config), model.device) as store:
        connector = TransformersConnector(model, store, min_tail_tokens=args.min_tail_tokens)
        started = time.perf_counter()
        saved_blocks = connector.save(prompt, reference[1])
        save_s = time.perf_counter() - started
        # The write-through copies to disk end here, so that they do not run during the host restores.
        store.flush()
        host = _prefills(lambda: connector, prompt, args.repeats)
    stores: list[Store] = []

    def reopened() -> TransformersConnector:
        # A new store on the same files: the host tier is empty, every block comes from disk.
        if stores:
            stores.pop().close()
        stores.append(_prepared(Store(layout, store_config), model.device))
        restarted = TransformersConnector(model, stores[-1], min_tail_tokens=args.min_tail_tokens)
        # The engine's process outlives the store's restart: its restores reuse the memory earlier ones used.
        restarted.restore_buffers = connector.restore_buffers
        return restarted

    try:
        disk = _prefills(reopened, prompt, args.repeats)
    finally:
        for store in stores:
            store.close()
    common.update({"model": connector.model_id, "saved_blocks": saved_blocks, "save_s": save_s,
                   "save_gbps": saved_blocks * layout.block_bytes / save_s / 1e9})
    kv_bytes = host[-1].restored_tokens * layout.token_bytes
    host_raw = host_copy_gbps(kv_bytes, model.device)
    disk_raw = raw_read_gbps(data_dir, kv_bytes, store_config.disk.io_threads)
    return [_record("host", host, reference, common, host_raw), _record("disk", disk, reference, common, disk_raw)]


def run_ttft(args: argparse.Namespace, config: StoreConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready document."""
    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be at least 1, got {args.repeats}")
    device = resolve_device(args.device)
    model = _model(args, device, resolve_dtype(args.dtype, device))
    _warm_up(model, args.vocab, args.min_tail_tokens)
    records = []
    for prompt_tokens in args.prompt_tokens:
        with tempfile.TemporaryDirectory(prefix="kvtier-bench-ttft-") as temp_dir:
            records += run_length(args, config, model, prompt_tokens, args.data_dir or temp_dir)
    return {"benchmark": "ttft", "device": device.type, "dtype": str(model.dtype).split(".")[-1],
            "records": records}


def _print_table(document: dict[str, Any]) -> None:
    print(f"ttft on {document['device']} ({document['dtype']}), medians of {document['records'][0]['repeats']}:")
    print(f"{'prompt':>7} {'source':>6} {'recompute s':>11} {'ttft s':>9} {'restore s':>9} {'tail s':>9} "
          f"{'save s':>8} {'restore GB/s':>12} {'raw GB/s':>9} {'speedup':>8}  {'KV':>6} {'max|dlogit|':>11} top-1")
    for r in document["records"]:
        diff = "identical" if r["logits_identical"] else f"{r['max_abs_logit_diff']:.1e}"
        print(f"{r['prompt_tokens']:7d} {r['source']:>6} {r['recompute_s']:11.3f} {r['ttft_kvtier_s']:9.3f} "
              f"{r['restore_s']:9.3f} {r['tail_forward_s']:9.3f} {r['save_s']:8.3f} {r['restore_gbps']:12.2f} "
              f"{r['raw_gbps']:9.2f} {r['speedup']:7.1f}x  {'equal' if r['kv_identical'] else 'DIFFER':>6} "
              f"{diff:>11} {'yes' if r['top1_agree'] else 'no'}")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    document = run_ttft(args, config)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_table(document)
    return 0 if all(record["contract_held"] for record in document["records"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier bench ttft", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
