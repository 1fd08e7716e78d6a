"""One tensor-parallel rank of an SGLang server on the CPU, for the backend's multi-process tests.

``python sglang_ranks.py JOB.json RANK``: joins a gloo process group of ``world`` ranks (SGLang's storage
threads all-reduce their hit counts over it), builds the rank's host pool (``kind``: mha or mla), opens the
backend through SGLang's factory with the job's kvtier settings and runs SGLang's controller storage threads
(``sglang_controller``): it backs up ``pages`` pages of one prompt (MLA: the same latent on every rank, as
the model replicates it; MHA: this rank's own heads), prefetches the prompt, then (with ``restart``) closes
the backend, opens it again (a server restart) and prefetches again. It writes ``OUT.RANK.json``: each
prefetch's hit and read tokens (after the rank MIN) and whether the pages read equal the pages written.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import sglang_controller as sc
import sglang_pools as sp
import torch
import torch.distributed as dist


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(sys.argv[2]), int(job["world"])
    dist.init_process_group("gloo", init_method=f"file://{job['rendezvous']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    groups = [dist.group.WORLD]
    pool = sp.make_pool(job["kind"], "page_first")
    pages = int(job["pages"])
    tokens = list(range(10_000, 10_000 + pages * sp.PAGE_TOKENS))
    written = pool.alloc(len(tokens))
    sp.fill(pool, written, seed=7 if job["kind"] == "mla" else 7 + rank)
    expected = torch.stack([sp.token_kv(pool, token).clone() for token in written.tolist()])
    result: dict[str, object] = {}
    for attempt in ("first", "restarted") if job["restart"] else ("first",):
        backend = sp.open_backend(pool, tp_rank=rank, tp_size=world, **job["kvtier"])
        controller = sc.storage_controller(backend, pool, sync_groups=groups)
        try:
            if attempt == "first":
                result["backed_up_tokens"] = sc.backup(controller, written, tokens)
            hit, read, indices = sc.prefetch(controller, tokens)
            same = read > 0 and torch.equal(
                torch.stack([sp.token_kv(pool, token) for token in indices[:read].tolist()]), expected[:read])
            result[attempt] = {"hit_tokens": hit, "read_tokens": read, "same_bytes": bool(same)}
            if read:
                pool.free(indices)
        finally:
            sc.stop(controller)
            backend.close()
    Path(f"{job['out']}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The storage threads' last all-reduce returns to its caller before gloo's worker thread drops the work's
    # tensors; when that drop falls into interpreter shutdown, the worker cannot take the GIL and ends inside
    # a noexcept destructor (std::terminate, SIGABRT: about one run in forty). The result is written: leave
    # without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
