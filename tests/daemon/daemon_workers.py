"""Client processes for the daemon tests, run as ``python daemon_workers.py COMMAND ...``.

- ``load ADDRESS SECONDS SEED NUM_KEYS``: random puts and gets over a shared key space for a bounded time;
  prints a JSON summary, counting every get that returned bytes other than those put under its key.
- ``crash ADDRESS``: reserves slots and writes half of each, takes read leases, prints ``READY`` and waits
  to be killed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time

import torch

from kvtier import KVLayout, StoreConfig
from kvtier.daemon import Client

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)  # 1 KiB blocks


def key_of(index: int, space: str = "load") -> bytes:
    return hashlib.sha256(f"{space}-{index}".encode()).digest()[:16]


def block_for(key: bytes) -> torch.Tensor:
    """The one block every test stores under ``key``, so that any reader can check what it got."""
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randn(LAYOUT.block_shape, generator=generator)


def load(address: str, seconds: float, seed: int, num_keys: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = dict.fromkeys(("puts", "put_failed", "gets", "hits", "misses", "mismatches"), 0)
    with Client(LAYOUT, StoreConfig(), address=address) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            keys = [key_of(i) for i in rng.sample(range(num_keys), rng.randint(1, 8))]
            if rng.random() < 0.5:
                result = client.put(keys, [block_for(key) for key in keys]).wait(30)
                counts["puts"] += len(keys)
                counts["put_failed"] += len(result.failed)
            else:
                out = [torch.full(LAYOUT.block_shape, float("nan")) for _ in keys]
                result = client.get(keys, out).wait(30)
                counts["gets"] += len(keys)
                for i, key in enumerate(keys):
                    if i in result.failed:
                        counts["misses"] += 1
                    elif torch.equal(out[i], block_for(key)):
                        counts["hits"] += 1
                    else:
                        counts["mismatches"] += 1
    return counts


def crash(address: str) -> None:
    client = Client(LAYOUT, StoreConfig(), address=address)
    committed = [key_of(i, "crash-committed") for i in range(4)]
    client.put(committed, [block_for(key) for key in committed]).wait(30)
    lease = client.acquire(committed)
    assert len(lease.keys) == 4
    reservation = client.reserve([key_of(i, "crash-partial") for i in range(32)])
    for key, slot in zip(reservation.keys, reservation.slots, strict=True):
        view = client.slot_view(slot)
        view[: view.numel() // 2] = block_for(key).reshape(-1)[: view.numel() // 2]
    print("READY", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    command, address = sys.argv[1], sys.argv[2]
    if command == "load":
        summary = load(address, float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        print(json.dumps(summary), flush=True)
    elif command == "crash":
        crash(address)
    else:
        raise SystemExit(f"unknown command {command}")
