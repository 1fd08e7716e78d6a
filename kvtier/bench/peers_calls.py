"""One chunk per call through kvtier and through LMCache, in one process, against raw copies of the chunk.

Run by ``kvtier bench peers`` in the peers environment (``lmcache`` 0.5.6 over CPU torch; ``make
bench-peers``): ``python -m kvtier.bench.peers_calls --rounds R --calls C --layouts 1b 7b``.

Promises:
- LMCache is driven as its engine drives it on a store and a retrieve: its ``StorageManager`` over its
  ``LocalCPUBackend`` (the CPU tier, no GPU needed), a put being ``allocate`` of a memory object, a copy of
  the chunk into it and ``batched_put``; a get being ``get`` of the memory object, a copy out of it and
  ``ref_count_down``. kvtier's put and get are ``Store.put`` / ``Store.get`` of the same chunk, waited for.
- Both are timed by ``kvtier.bench.host.measure_per_call`` in the same rounds as the raw copies (methods take
  turns going first); every chunk each one holds is read back at the end and compared byte for byte.
- Prints one JSON object: ``records``, one per layout (``per_call``: the layout's name) with kvtier's,
  LMCache's and the raw copies' median ms and the ratios (``put_vs_lmcache`` < 1: kvtier's put is faster);
  or, where LMCache cannot start, ``status: "not run"`` with the error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import traceback
from typing import Any

import torch

from kvtier.bench.host import PER_CALL_LAYOUTS, measure_per_call
from kvtier.layout import KVLayout


class LMCacheCpu:
    """LMCache's storage manager over its CPU backend, one chunk of ``layout`` per call."""

    def __init__(self, layout: KVLayout, capacity_bytes: int) -> None:
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        self._key_type = CacheEngineKey
        self.dtype = layout.torch_dtype
        # LMCache's KV_2LTD chunk: layers x (K, V) x tokens x heads x dims.
        self.shape = torch.Size((layout.num_layers, 2, layout.block_tokens, layout.num_kv_heads, layout.head_dim))
        config = LMCacheEngineConfig.from_defaults(chunk_size=layout.block_tokens, local_cpu=True,
                                                   max_local_cpu_size=capacity_bytes / (1 << 30),
                                                   lmcache_instance_id="kvtier-bench")
        metadata = LMCacheMetadata(model_name="kvtier-bench", world_size=1, local_world_size=1, worker_id=0,
                                   local_worker_id=0, kv_dtype=self.dtype, kv_shape=tuple(self.shape))
        self.manager = StorageManager(config, metadata, EventManager())
        self._hashes = itertools.count(1)

    def put(self, chunk: torch.Tensor) -> object:
        key = self._key_type("kvtier-bench", 1, 0, next(self._hashes), self.dtype)
        memory = self.manager.allocate(self.shape, self.dtype)
        if memory is None:
            raise RuntimeError("LMCache could not allocate a chunk")
        memory.tensor.view(-1).copy_(chunk.view(-1))
        self.manager.batched_put([key], [memory])
        return key

    def get(self, handle: object, out: torch.Tensor) -> None:
        memory = self.manager.get(handle)
        if memory is None:
            raise RuntimeError("LMCache lost a chunk")
        try:
            out.view(-1).copy_(memory.tensor.view(-1))
        finally:
            memory.ref_count_down()

    def close(self) -> None:
        self.manager.close()


def run_calls(rounds: int, calls: int, layouts: list[str], num_workers: int) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    for name in layouts:
        layout = PER_CALL_LAYOUTS[name]
        record: dict[str, Any] = {"per_call": name}
        try:
            # Room for the chunks read back and every fresh put of the run (LMCache evicts by LRU too).
            peer = LMCacheCpu(layout, (8 + 2 * rounds * calls) * layout.block_bytes)
        except Exception as exc:  # a peer that cannot start is reported, never left out
            records.append({**record, "status": "not run", "error": f"{type(exc).__name__}: {exc}",
                            "error_tail": traceback.format_exc()[-3000:]})
            continue
        try:
            record.update(measure_per_call(layout, rounds, calls, num_workers, {"lmcache": peer}))
        finally:
            peer.close()
        records.append({**record, "status": "ok"})
    return {"benchmark": "peers_calls", "records": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.peers_calls", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", choices=sorted(PER_CALL_LAYOUTS), default=list(PER_CALL_LAYOUTS))
    parser.add_argument("--workers", type=int, default=2, help="kvtier's CPU transfer workers")
    args = parser.parse_args(argv)
    print(json.dumps(run_calls(args.rounds, args.calls, args.layouts, args.workers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
