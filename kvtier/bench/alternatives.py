"""``kvtier bench alternatives``: kvtier against what a user would do instead, on one multi-turn prefix workload.

The workload is the demo's (``kvtier demo``): a small Llama-shaped model with seeded random weights
(``DEMO_MODEL``, fp32, the ``kvtier_exact`` attention so that a restored prefix gives the recompute's very
logits), one shared system prompt, conversations whose turns grow (previous prompt + a reply + a new user
message), conversations interleaved. Every request is served by each alternative in turn, each with its own
state, so that background load hits them alike:

- ``recompute``: no cache, a full prefill.
- ``safetensors``: what a user writes by hand. After each request, the whole prompt's KV goes to one
  ``safetensors`` file named by a digest of its tokens; a request reuses the longest stored prompt that is
  an exact prefix of it (so a conversation's next turn hits; the shared system prompt alone never does).
- ``lmdb``: the prompt's KV blocks (kvtier's blocks and keys, through the same connector) as blobs in one
  LMDB environment with its default durability, no host tier: every restore reads the map.
- ``kvtier-host``: kvtier's host tier alone, sized to a third of the workload's blocks or twice the longest
  prompt, the larger (below the workload: it evicts).
- ``kvtier-host+disk``: the same host tier over a disk tier (write-back, ``admit_all``).

Promises: one JSON record per alternative (``--json`` prints the list): ``requests``, ``prompt_tokens``,
``restored_tokens``, ``hit_ratio`` (restored / prompt tokens), ``ttft_total_s``, ``ttft_median_s``,
``save_s`` (time to store the KV, after the first token), ``disk_bytes`` (stored data on disk at the end;
for kvtier the bytes its disk tier wrote), ``disk_allocated_bytes`` (what the filesystem allocated: kvtier
preallocates its whole disk capacity),
``identical_logits`` (requests whose first-token logits are ``torch.equal`` to the recompute's) and
``speedup_vs_recompute`` (total TTFT). Temporary directories are removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lmdb
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from kvtier import DiskConfig, Store, StoreConfig
from kvtier.bench.progress import track
from kvtier.config import MiB
from kvtier.errors import CapacityError
from kvtier.keys import BlockHasher, HashAlgo, Namespace
from kvtier.layout import KVLayout
from kvtier.store import Lease, LookupResult, Reservation, Tier
from kvtier_connectors.transformers.adapter import TransformersConnector, cache_kwarg, kv_layout
from kvtier_connectors.transformers.demo import DEMO_MODEL
from kvtier_connectors.transformers.exact import MIN_ROWS, NAME, register
from kvtier_connectors.transformers.models import random_model

HELP = "kvtier vs recompute, one safetensors file per prefix, LMDB blobs: TTFT, hit ratio, bytes on disk"


@dataclass(frozen=True)
class Served:
    ttft_s: float
    restored_tokens: int
    save_s: float
    logits: torch.Tensor


class Alternative(Protocol):
    name: str

    def serve(self, prompt: torch.Tensor) -> Served: ...

    def disk_bytes(self) -> tuple[int, int]:
        """(bytes of stored data on disk, bytes the filesystem allocated for it)."""

    def close(self) -> None: ...


def _directory_bytes(path: Path) -> tuple[int, int]:
    files = [entry.stat() for entry in path.rglob("*") if entry.is_file()]
    return sum(stat.st_size for stat in files), sum(stat.st_blocks * 512 for stat in files)


class Recompute:
    name = "recompute"

    def __init__(self, model: Any) -> None:
        self.model = model

    def serve(self, prompt: torch.Tensor) -> Served:
        started = time.perf_counter()
        with torch.no_grad():
            logits = self.model(prompt, logits_to_keep=1).logits[:, -1]
        return Served(time.perf_counter() - started, 0, 0.0, logits)

    def disk_bytes(self) -> tuple[int, int]:
        return 0, 0

    def close(self) -> None:
        pass


class SafetensorsPerPrefix:
    """One file per whole prompt; reuse of a stored prompt that is an exact prefix of the request."""

    name = "safetensors"

    def __init__(self, model: Any, directory: Path) -> None:
        self.model = model
        self.directory = directory
        self.lengths: set[int] = set()
        self.cache_kwarg = cache_kwarg(model)

    @staticmethod
    def _digest(tokens: torch.Tensor) -> str:
        return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:32]

    def _stored_prefix(self, prompt: torch.Tensor) -> tuple[int, Path | None]:
        # At least MIN_ROWS tokens are recomputed, as the connector does, so the logits can be identical.
        for length in sorted(self.lengths, reverse=True):
            path = self.directory / f"{self._digest(prompt[0, :length])}.safetensors"
            if length <= prompt.shape[1] - MIN_ROWS and path.exists():
                return length, path
        return 0, None

    def serve(self, prompt: torch.Tensor) -> Served:
        started = time.perf_counter()
        length, path = self._stored_prefix(prompt)
        cache = DynamicCache(config=self.model.config)
        if path is not None:
            tensors = load_file(path)
            for layer in range(len(tensors) // 2):
                cache.update(tensors[f"k{layer}"], tensors[f"v{layer}"], layer)
        with torch.no_grad():
            output = self.model(prompt[:, length:], use_cache=True, logits_to_keep=1, **{self.cache_kwarg: cache})
        ttft_s = time.perf_counter() - started
        started = time.perf_counter()
        layers: list[Any] = list(cache.layers)
        save_file({f"{kind}{i}": (layer.keys if kind == "k" else layer.values).contiguous()
                   for i, layer in enumerate(layers) for kind in ("k", "v")},
                  str(self.directory / f"{self._digest(prompt[0])}.safetensors"))
        self.lengths.add(prompt.shape[1])
        return Served(ttft_s, length, time.perf_counter() - started, output.logits[:, -1])

    def disk_bytes(self) -> tuple[int, int]:
        return _directory_bytes(self.directory)

    def close(self) -> None:
        pass


class LmdbBlockStore:
    """KV blocks as blobs in one LMDB environment, no host tier: the part of a store the connector uses.

    A read copies the blob out of the map into a buffer the connector reads as a "slot"; a write commits
    one LMDB transaction (synced, LMDB's default) per reservation.
    """

    def __init__(self, path: Path, layout: KVLayout, map_bytes: int, hash_algo: str, num_slots: int = 64) -> None:
        self._layout = layout
        self._hash_algo = hash_algo
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_bytes)
        # Staging rows, not a cache: a slot lives from reserve/acquire to commit/abort/release.
        self._rows = torch.empty((num_slots, layout.block_bytes), dtype=torch.uint8)
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def layout(self) -> KVLayout:
        return self._layout

    def hasher(self, model_id: str, tp_rank: int = 0, tp_size: int = 1, tenant_salt: str = "") -> BlockHasher:
        namespace = Namespace.for_layout(model_id, self._layout, tp_rank, tp_size, tenant_salt)
        algo: HashAlgo = self._hash_algo  # type: ignore[assignment]
        return BlockHasher(namespace, self._layout.block_tokens, algo)

    def lookup(self, keys: Sequence[bytes], *, prefetch: bool = True) -> LookupResult:
        found = 0
        with self.env.begin() as txn, txn.cursor() as cursor:
            for key in keys:
                if not cursor.set_key(key):
                    break
                found += 1
        return LookupResult(found, (Tier.DISK,) * found)

    def _buffer(self) -> int:
        if not self._free:
            raise CapacityError(f"all {self._rows.shape[0]} staging rows are reserved or leased")
        return self._free.pop()

    def reserve(self, keys: Sequence[bytes]) -> Reservation:
        with self.env.begin() as txn:
            present = {key for key in keys if txn.get(key) is not None}
        todo = tuple(key for key in keys if key not in present)
        if len(todo) > len(self._free):
            raise CapacityError(f"{len(todo)} blocks but {len(self._free)} free staging rows")
        return Reservation(todo, tuple(self._buffer() for _ in todo), tuple(key for key in keys if key in present))

    def commit(self, reservation: Reservation) -> None:
        with self.env.begin(write=True) as txn:
            for key, slot in zip(reservation.keys, reservation.slots, strict=True):
                txn.put(key, self._rows[slot].numpy().tobytes())
        self._free.extend(reservation.slots)

    def abort(self, reservation: Reservation) -> None:
        self._free.extend(reservation.slots)

    def acquire(self, keys: Sequence[bytes], timeout: float | None = None) -> Lease:
        run: list[bytes] = []
        slots: list[int] = []
        with self.env.begin(buffers=True) as txn:
            for key in keys:
                blob = txn.get(key)
                if blob is None:
                    break
                slot = self._buffer()
                self._rows[slot].numpy()[:] = np.frombuffer(blob, dtype=np.uint8)
                run.append(key)
                slots.append(slot)
        return Lease(tuple(run), tuple(slots))

    def release(self, lease: Lease) -> None:
        self._free.extend(lease.slots)

    def slot_view(self, slot: int, handle: object = None) -> torch.Tensor:
        return self._rows[slot].view(self._layout.torch_dtype)

    def slot_rows(self, handle: object = None) -> torch.Tensor:
        return self._rows

    def disk_bytes(self) -> tuple[int, int]:
        used = int((self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"])
        return used, _directory_bytes(self.path)[1]

    def close(self) -> None:
        self.env.close()


class ThroughConnector:
    """An alternative that serves through ``TransformersConnector`` over some block store."""

    def __init__(self, name: str, model: Any, store: Any, directory: Path | None) -> None:
        self.name = name
        self.store = store
        self.directory = directory
        self.connector = TransformersConnector(model, store)

    def serve(self, prompt: torch.Tensor) -> Served:
        result = self.connector.prefill(prompt, logits_to_keep=1)
        return Served(result.ttft_s, result.restored_tokens, result.save_s, result.logits[:, -1])

    def disk_bytes(self) -> tuple[int, int]:
        if isinstance(self.store, LmdbBlockStore):
            return self.store.disk_bytes()
        if not isinstance(self.store, Store) or self.store.disk is None or self.directory is None:
            return 0, 0
        # The tier preallocates its whole capacity: the data is what it wrote (no region was evicted here).
        self.store.flush()
        return self.store.disk.stats().bytes_written, _directory_bytes(self.directory)[1]

    def close(self) -> None:
        self.store.close()


def workload(conversations: int, turns: int, system_tokens: int, vocab_size: int,
             seed: int) -> list[torch.Tensor]:
    """The prompts in request order: conversations interleaved, each turn = previous + reply + new message."""
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (1, count), generator=generator)

    system = draw(system_tokens)
    histories = [system for _ in range(conversations)]
    prompts = []
    for turn in range(turns):
        for conversation in range(conversations):
            reply = draw(48) if turn else draw(0)
            histories[conversation] = torch.cat([histories[conversation], reply,
                                                 draw(80 + 24 * ((conversation + turn) % 3))], dim=1)
            prompts.append(histories[conversation])
    return prompts


def unique_blocks(prompts: list[torch.Tensor], block_tokens: int) -> int:
    """Distinct whole-block prefixes of the workload (what a cache holding everything would store)."""
    seen = {prompt[0, : (i + 1) * block_tokens].numpy().tobytes()
            for prompt in prompts for i in range(prompt.shape[1] // block_tokens)}
    return len(seen)


def _summary(name: str, served: list[Served], prompts: list[torch.Tensor], reference: list[torch.Tensor],
             disk_bytes: tuple[int, int], extra: dict[str, Any]) -> dict[str, Any]:
    prompt_tokens = sum(prompt.shape[1] for prompt in prompts)
    restored = sum(item.restored_tokens for item in served)
    return {"benchmark": "alternatives", "alternative": name, "requests": len(served),
            "prompt_tokens": prompt_tokens, "restored_tokens": restored,
            "hit_ratio": round(restored / prompt_tokens, 4),
            "ttft_total_s": round(sum(item.ttft_s for item in served), 4),
            "ttft_median_s": round(statistics.median(item.ttft_s for item in served), 4),
            "save_s": round(sum(item.save_s for item in served), 4), "disk_bytes": disk_bytes[0],
            "disk_allocated_bytes": disk_bytes[1],
            "identical_logits": sum(bool(torch.equal(item.logits, ref)) for item, ref in zip(served, reference,
                                                                                             strict=True)),
            **extra}


def run_alternatives(*, conversations: int = 6, turns: int = 4, system_tokens: int = 384, block_tokens: int = 32,
                     seed: int = 0, model_fields: dict[str, Any] | None = None,
                     config: StoreConfig | None = None) -> list[dict[str, Any]]:
    """Serve the workload with every alternative; one summary record each (see the module docstring)."""
    register()
    model = random_model("llama", attn_implementation=NAME, seed=seed, **(model_fields or DEMO_MODEL))
    layout = kv_layout(model, block_tokens)
    prompts = workload(conversations, turns, system_tokens, int(model.config.vocab_size), seed + 1)
    workload_blocks = unique_blocks(prompts, block_tokens)
    # A third of the workload, but at least twice the longest prompt: a restore holds all of its blocks in
    # host slots at once, and its promotions from disk evict host blocks; with a host tier barely larger than
    # the prompt they evict the prompt's own blocks and the restore comes back short (seen: none of 15).
    longest_blocks = max(prompt.shape[1] for prompt in prompts) // block_tokens
    host_blocks = max(2 * (longest_blocks + 1), workload_blocks // 3)
    base = config or StoreConfig()
    host_only = dataclasses.replace(base, host=dataclasses.replace(base.host, capacity_bytes=host_blocks *
                                                                   layout.block_bytes), disk=DiskConfig())
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-alternatives-") as temp:
        root = Path(temp)
        for name in ("safetensors", "lmdb", "disk"):
            (root / name).mkdir()
        disk = dataclasses.replace(base.disk, paths=(str(root / "disk"),), capacity_bytes=512 * MiB,
                                   region_bytes=4 * MiB, admission="admit_all", write_mode="back")
        alternatives: list[Alternative] = [
            Recompute(model),
            SafetensorsPerPrefix(model, root / "safetensors"),
            ThroughConnector("lmdb", model,
                             LmdbBlockStore(root / "lmdb", layout, 4 * 2**30, base.hash_algo, host_blocks), None),
            ThroughConnector("kvtier-host", model, Store(layout, host_only), None),
            ThroughConnector("kvtier-host+disk", model, Store(layout, dataclasses.replace(host_only, disk=disk)),
                             root / "disk"),
        ]
        served: dict[str, list[Served]] = {alternative.name: [] for alternative in alternatives}
        try:
            for prompt in track(prompts, "alternatives: requests"):
                for alternative in alternatives:
                    served[alternative.name].append(alternative.serve(prompt))
            disk_bytes = {alternative.name: alternative.disk_bytes() for alternative in alternatives}
        finally:
            for alternative in alternatives:
                alternative.close()
    reference = [item.logits for item in served["recompute"]]
    extra = {"workload_blocks": workload_blocks, "host_blocks": host_blocks, "block_tokens": block_tokens,
             "block_bytes": layout.block_bytes, "conversations": conversations, "turns": turns}
    records = [_summary(name, items, prompts, reference, disk_bytes[name], extra) for name, items in served.items()]
    recompute_s = records[0]["ttft_total_s"]
    for record in records:
        record["speedup_vs_recompute"] = round(recompute_s / record["ttft_total_s"], 3)
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=384, help="tokens of the shared system prompt")
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 conversations of 3 turns, a 256-token system prompt")
    parser.add_argument("--json", action="store_true", help="print the records as one JSON list")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    sizes = (4, 3, 256) if args.quick else (args.conversations, args.turns, args.system_tokens)
    records = run_alternatives(conversations=sizes[0], turns=sizes[1], system_tokens=sizes[2],
                               block_tokens=args.block_tokens, seed=args.seed, config=config)
    if args.json:
        print(json.dumps(records))
        return 0
    print(f"{'alternative':18} {'hit ratio':>9} {'TTFT s':>8} {'speedup':>8} {'save s':>7} {'disk MiB':>9} identical")
    for r in records:
        print(f"{r['alternative']:18} {r['hit_ratio']:>9} {r['ttft_total_s']:>8} {r['speedup_vs_recompute']:>8} "
              f"{r['save_s']:>7} {r['disk_bytes'] / 2**20:>9.2f} {r['identical_logits']}/{r['requests']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/alternatives.py``: parse ``argv`` and run with the default configuration."""
    parser = argparse.ArgumentParser(prog="kvtier bench alternatives", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())


if __name__ == "__main__":
    sys.exit(main())
