"""Two hosts, one cache: two ``kvtier serve`` daemons (separate pools, separate disk directories) over one
real 3-master cluster. A prompt stored through the first is restored byte-identical through the second; when
the cluster goes away, both keep serving from their own tiers, and come back to it when it returns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvtier import Client, KVLayout, StoreConfig, Tier
from kvtier.tiers.servers import LocalServers, server_binary, start_cluster

NO_BINARY = "no Redis-protocol server binary: `make test` installs redis-server (or set KVTIER_REDIS_SERVER)"

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"


@dataclass
class Host:
    proc: subprocess.Popen[bytes]
    workdir: str

    @property
    def log(self) -> str:
        return (Path(self.workdir) / "daemon.log").read_text()

    def client(self) -> Client:
        return Client(LAYOUT, StoreConfig(), address=f"unix:{self.workdir}/d.sock")


def start_host(cluster: LocalServers) -> Host:
    """A daemon started (not yet ready: see ``wait_ready``) with its own pool and disk, over ``cluster``."""
    workdir = tempfile.mkdtemp(prefix="kvh", dir="/tmp")  # short: a Unix socket path has at most 107 bytes
    urls = "[" + ",".join(f'"{url}"' for url in cluster.urls) + "]"
    settings = [f"remote.urls={urls}", "remote.mode=cluster", "remote.timeout_ms=500",
                "remote.connect_timeout_ms=300", "remote.reconnect_max_ms=300", f"remote.key_prefix=h{os.getpid()}",
                "disk.capacity_bytes=1MiB", "disk.region_bytes=64KiB"]
    command = [sys.executable, "-m", "kvtier.daemon", "--log-level", "INFO",
               *[arg for setting in settings for arg in ("--set", setting)], "serve", "--socket",
               f"{workdir}/d.sock", "--pool", "256KiB", "--metrics-port", "0", "--disk", f"{workdir}/disk",
               "--layout", LAYOUT_ARG]
    with open(Path(workdir) / "daemon.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return Host(proc, workdir)


def wait_ready(host: Host) -> None:
    deadline = time.monotonic() + 60
    while "daemon ready" not in host.log:
        if host.proc.poll() is not None or time.monotonic() > deadline:
            host.proc.kill()
            raise RuntimeError(f"the daemon did not start:\n{host.log}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalServers]:
    """This module's own cluster: its last test kills it."""
    if server_binary() is None:
        pytest.skip(NO_BINARY)
    with start_cluster(3) as servers:
        yield servers


@pytest.fixture(scope="module")
def two_hosts(cluster: LocalServers) -> Iterator[tuple[Host, Host]]:
    """Both daemons serve both tests (in file order: the second one takes the cluster away)."""
    hosts = (start_host(cluster), start_host(cluster))  # both start at once: imports take seconds
    try:
        for host in hosts:
            wait_ready(host)
        yield hosts
    finally:
        for host in hosts:
            if host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
    for host in hosts:
        assert host.proc.wait(30) == 0, host.log
        shutil.rmtree(host.workdir, ignore_errors=True)


def blocks(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.block_shape, generator=generator) for _ in range(count)]


def wait_for(condition: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def restore(client: Client, keys: list[bytes]) -> list[torch.Tensor]:
    out = [torch.zeros(LAYOUT.block_shape) for _ in keys]
    result = client.get(keys, out).wait(10)
    assert result.ok, result
    return out


def test_a_prompt_stored_through_one_daemon_is_restored_byte_identical_through_another(
        two_hosts: tuple[Host, Host]) -> None:
    first, second = (host.client() for host in two_hosts)
    keys = first.hasher("model-a").keys(list(range(16 * 4)))
    saved = blocks(16, seed=7)
    assert first.put(keys, saved).wait(10).ok
    # The first daemon sends new blocks on commit, asynchronously: the second sees them shortly after.
    wait_for(lambda: second.lookup(keys, prefetch=False).num_blocks == 16)
    assert second.lookup(keys).tiers == (Tier.REMOTE,) * 16
    restored = restore(second, keys)
    assert all(torch.equal(a, b) for a, b in zip(restored, saved, strict=True))
    assert second.lookup(keys).tiers == (Tier.HOST,) * 16
    remote = second.stats().tiers["remote"]
    assert remote.detail["hits"] == 16 and remote.detail["checksum_failures"] == 0
    first.close()
    second.close()


def test_both_daemons_keep_serving_when_the_cluster_goes_away_and_rejoin_it(
        two_hosts: tuple[Host, Host], cluster: LocalServers) -> None:
    first, second = (host.client() for host in two_hosts)
    keys = first.hasher("model-b").keys(list(range(24 * 4)))
    saved = blocks(24, seed=8)
    assert first.put(keys[:8], saved[:8]).wait(10).ok
    wait_for(lambda: second.lookup(keys[:8], prefetch=False).num_blocks == 8)
    cluster.kill(0, 1, 2)
    for client, own in ((first, slice(8, 16)), (second, slice(16, 24))):
        started = time.monotonic()
        assert client.put(keys[own], saved[own]).wait(10).ok
        assert client.lookup(keys[own]).tiers == (Tier.HOST,) * 8
        assert all(torch.equal(a, b) for a, b in zip(restore(client, keys[own]), saved[own], strict=True))
        assert time.monotonic() - started < 5
    assert first.lookup(keys[:8]).tiers == (Tier.HOST,) * 8
    assert all(torch.equal(a, b) for a, b in zip(restore(first, keys[:8]), saved[:8], strict=True))
    wait_for(lambda: second.stats().tiers["remote"].detail["up"] is False or second.lookup(keys[:8]).num_blocks == 0)
    assert second.lookup(keys[:8], prefetch=False).num_blocks == 0  # gone with the cluster: a miss, never junk
    for host in two_hosts:
        assert "remote tier down" in host.log
    cluster.restart(0, 1, 2)
    wait_for(lambda: all(client.stats().tiers["remote"].detail["up"] for client in (first, second)))
    more = first.hasher("model-b").keys(list(range(30 * 4)))[24:]
    again = blocks(6, seed=9)
    assert first.put(more, again).wait(10).ok
    wait_for(lambda: second.lookup(more, prefetch=False).num_blocks == 6)
    assert all(torch.equal(a, b) for a, b in zip(restore(second, more), again, strict=True))
    first.close()
    second.close()
