"""Programs the small-``/dev/shm`` tests run inside a mount namespace whose ``/dev/shm`` is a small tmpfs.

- ``embedded MIB``: an embedded store of MIB MiB; every slot put and read back; prints ``OK``.
- ``named MIB``: a named arena of MIB MiB; prints the ``ConfigError`` and what ``/dev/shm`` holds after it.
- ``daemon SOCKET POOL``: a daemon with that pool; then ``/dev/shm`` is filled up by another file, and a client
  puts and reads back a whole pool of blocks; prints ``OK`` and the daemon's exit status after SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import torch
from daemon_workers import LAYOUT, block_for, key_of

from kvtier import HostConfig, Store, StoreConfig, TransferConfig
from kvtier.arena import HostArena
from kvtier.daemon import Client
from kvtier.errors import ConfigError, KvtierError

LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"


def fill_all(client: Store | Client, num_blocks: int) -> None:
    keys = [key_of(i, "shm") for i in range(num_blocks)]
    assert client.put(keys, [block_for(key) for key in keys]).wait(60).ok
    out = [torch.empty_like(block_for(key)) for key in keys]
    assert client.get(keys, out).wait(60).ok
    assert all(torch.equal(got, block_for(key)) for got, key in zip(out, keys, strict=True))


def embedded(mib: int) -> None:
    config = StoreConfig(host=HostConfig(capacity_bytes=mib * 2**20), transfer=TransferConfig(backend="cpu"))
    with Store(LAYOUT, config) as store:
        fill_all(store, store.arena.num_slots)
    print("OK", flush=True)


def named(mib: int) -> None:
    try:
        HostArena(mib * 256, 4096, name="kvtier-test-named")
    except ConfigError as exc:
        print(exc, flush=True)
    print("LEFT", sorted(os.listdir("/dev/shm")), flush=True)


def daemon(socket_path: str, pool: str) -> None:
    # No background prefault: the pages the clients touch first are faulted in only then.
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "--set", "host.prefault=false", "serve", "--socket",
                             socket_path, "--pool", pool, "--no-disk", "--metrics-port", "0", "--layout", LAYOUT_ARG])
    deadline = time.monotonic() + 60
    while True:
        try:
            client = Client(LAYOUT, StoreConfig(), address=f"unix:{socket_path}")
            break
        except KvtierError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    # Another tenant takes every free byte of /dev/shm; the pool's pages must be the daemon's already.
    with open("/dev/shm/hog", "wb") as hog, contextlib.suppress(OSError):
        while True:
            hog.write(b"\1" * 2**20)
            hog.flush()
    try:
        with client:
            fill_all(client, client.arena.num_slots if client.arena else 0)
        print("OK", flush=True)
    finally:
        proc.terminate()
        print("EXIT", proc.wait(30), flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "embedded":
        embedded(int(sys.argv[2]))
    elif command == "named":
        named(int(sys.argv[2]))
    elif command == "daemon":
        daemon(sys.argv[2], sys.argv[3])
