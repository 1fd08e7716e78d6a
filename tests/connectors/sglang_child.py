"""A second SGLang process for the backend's tests: it reads pages from a kvtier daemon into its own host pools.

``python sglang_child.py JOBS.json OUT.pt``: each job names a daemon address, the kind of pool (mha or mla) and
page hashes; for every job and host layout this process builds a fresh host pool, opens the backend through
SGLang's factory, asks ``batch_exists`` for the hashes plus one page nobody stored, reads the pages with
``batch_get_v1`` and saves what it found and the KV of every token it read into OUT.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sglang_pools as sp
import torch


def main() -> None:
    found = {}
    for job in json.loads(Path(sys.argv[1]).read_text()):
        hashes: list[str] = job["hashes"]
        for layout in sp.HOST_LAYOUTS:
            pool = sp.make_pool(job["kind"], layout)
            backend = sp.open_backend(pool, store="daemon", address=job["address"])
            pool.alloc(sp.PAGE_TOKENS)  # other host indices than the writer's
            read = pool.alloc(len(hashes) * sp.PAGE_TOKENS)
            hits = backend.batch_exists([*hashes, sp.page_hashes(1, first_token=999_999)[0]])
            results = backend.batch_get_v1(hashes, read)
            found[f"{job['kind']}/{layout}"] = {
                "hits": hits, "results": results,
                "kv": torch.stack([sp.token_kv(pool, token) for token in read.tolist()])}
            backend.close()
    torch.save(found, sys.argv[2])


if __name__ == "__main__":
    main()
