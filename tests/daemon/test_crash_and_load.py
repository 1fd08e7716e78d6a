"""Client processes against a daemon: one SIGKILLed while holding slots, several hammering it at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvtier import CapacityError

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import DaemonProc, Kit

WORKERS = str(Path(__file__).with_name("daemon_workers.py"))


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_killed_client_gives_back_its_slots_and_leaves_no_partial_block(
        make_daemon: Callable[..., DaemonProc], kit: Kit) -> None:
    daemon = make_daemon(pool="256KiB")  # 64 slots
    worker = subprocess.Popen([sys.executable, WORKERS, "crash", daemon.address], stdout=subprocess.PIPE)
    assert worker.stdout is not None and worker.stdout.readline().strip() == b"READY"
    held = daemon.stats()
    assert (held["daemon"]["reserved_blocks"], held["daemon"]["leased_blocks"]) == (32, 4)
    assert held["stats"]["tiers"]["host"]["detail"]["writing_blocks"] == 32
    worker.kill()
    worker.wait()

    def released() -> bool:
        stats: dict[str, Any] = daemon.stats()
        return stats["daemon"]["reserved_blocks"] == stats["daemon"]["leased_blocks"] == 0
    wait_for(released)
    host = daemon.stats()["stats"]["tiers"]["host"]
    assert host["detail"]["writing_blocks"] == 0 and host["detail"]["pinned_blocks"] == 0
    assert host["used_blocks"] == 4  # only the committed blocks remain
    partial = [kit.key_of(i, "crash-partial") for i in range(32)]
    with daemon.client() as client:
        assert all(client.contains(key) is None for key in partial)
        out = [torch.empty(kit.layout.block_shape) for _ in partial]
        assert len(client.get(partial, out).wait(10).failed) == 32
        # Every slot can be had again: a reservation of the whole pool succeeds.
        reservation = client.reserve([kit.key_of(i, "refill") for i in range(64)])
        assert len(reservation.slots) == 64
        try:
            client.reserve([kit.key_of(0, "one-too-many")])
            raise AssertionError("the pool should be full of slots being written")
        except CapacityError:
            pass
        client.abort(reservation)


def _rss_anon_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_several_clients_at_once_get_exactly_what_was_put_or_a_miss(
        make_daemon: Callable[..., DaemonProc]) -> None:
    daemon = make_daemon(pool="256KiB")  # 64 slots for 200 keys: constant eviction
    (arena,) = Path("/dev/shm").glob(f"kvtier-daemon-{daemon.proc.pid}-*")
    rss_before = _rss_anon_bytes(daemon.proc.pid)
    workers = [subprocess.Popen([sys.executable, WORKERS, "load", daemon.address, "3", str(seed), "200"],
                                stdout=subprocess.PIPE) for seed in range(3)]
    results = [json.loads(worker.communicate(timeout=120)[0]) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sum(result["mismatches"] for result in results) == 0, results
    assert sum(result["hits"] for result in results) > 0 and sum(result["misses"] for result in results) > 0
    assert arena.stat().st_size == 256 * 1024
    host = daemon.stats()["stats"]["tiers"]["host"]
    assert host["used_blocks"] <= host["capacity_blocks"] == 64 and host["evicted_blocks"] > 0
    # The payloads live in the arena: the daemon's private memory grows by bookkeeping only.
    assert _rss_anon_bytes(daemon.proc.pid) - rss_before < 32 * 2**20
