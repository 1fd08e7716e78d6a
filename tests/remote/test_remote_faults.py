"""Faults of the remote tier against real servers: down at start, killed mid-run, hung, full (OOM replies),
a cluster slot moved. Whatever happens: no call waits past its timeout, no wrong bytes, counters and logs."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import torch
from remote_blocks import block_key, random_block, read_block
from resp_server import ScriptedServer

from kvtier.layout import KVLayout
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4)  # 512 B
BIG = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", block_tokens=4)  # 32 KiB
# A call on a dead or hung server may take the reply timeout (0.5 s in these tests) once; allow for a busy CI.
BOUND_S = 3.0


def key(i: int, space: str = "fault") -> bytes:
    return block_key(i, space)


def payload(i: int, nbytes: int = LAYOUT.block_bytes) -> torch.Tensor:
    return random_block(i, nbytes)


def read(tier: RemoteTier, k: bytes) -> torch.Tensor | None:
    return read_block(tier, k, BOUND_S * 2)


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def store_and_check(tier: RemoteTier, space: str, count: int = 8) -> None:
    keys = [key(i, space) for i in range(count)]
    assert all(tier.offer(k, payload(i, tier.block_bytes)) for i, k in enumerate(keys))
    tier.flush()
    assert tier.locate(keys) == [True] * count
    for i, k in enumerate(keys):
        assert torch.equal(read(tier, k), payload(i, tier.block_bytes))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_server_down_at_start_is_a_miss_until_it_comes_up(
        fresh_single: Callable[..., LocalServers], config_for: RemoteConfigFor,
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    placeholder = LocalServers("single", "/nonexistent")
    config = config_for(placeholder, urls=(f"redis://127.0.0.1:{port}",))
    with caplog.at_level(logging.INFO, logger="kvtier.tiers.remote"):
        tier, took_s = timed(lambda: RemoteTier(config, LAYOUT))
        assert isinstance(tier, RemoteTier)
        try:
            assert took_s < BOUND_S and not tier.up
            assert "remote tier down: connect failed" in caplog.text
            assert tier.locate([key(0)]) == [False]
            assert not tier.offer(key(0), payload(0))
            assert read(tier, key(0)) is None
            detail = tier.stats(0).detail
            assert detail["down_dropped"] == 1 and detail["misses"] == 1 and detail["faults"] >= 1
            fresh_single(port=port)
            wait_until(lambda: tier.up)
            assert "remote tier back up" in caplog.text and tier.stats(0).detail["reconnects"] == 1
            store_and_check(tier, "late")
        finally:
            tier.close()


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_servers_killed_mid_run_cost_one_timeout_then_nothing_and_come_back(
        mode: str, fresh_single: Callable[..., LocalServers], fresh_cluster: LocalServers,
        config_for: RemoteConfigFor, caplog: pytest.LogCaptureFixture) -> None:
    servers = fresh_single() if mode == "single" else fresh_cluster
    tier = RemoteTier(config_for(servers), LAYOUT)
    try:
        store_and_check(tier, "before")
        every = range(len(servers.nodes))
        servers.kill(*every)
        with caplog.at_level(logging.WARNING, logger="kvtier.tiers.remote"):
            found, took_s = timed(lambda: tier.locate([key(i, "before") for i in range(8)]))
        assert found == [False] * 8 and took_s < BOUND_S
        assert not tier.up and "remote tier down: lookup failed" in caplog.text
        for call in (lambda: tier.locate([key(0, "before")]), lambda: tier.offer(key(9), payload(9)),
                     lambda: read(tier, key(0, "before"))):
            result, took_s = timed(call)
            assert result in ([False], False, None) and took_s < 0.1  # down: answered at once
        servers.restart(*every)
        wait_until(lambda: tier.up)
        assert read(tier, key(0, "before")) is None  # the restarted servers are empty: a miss, not old bytes
        store_and_check(tier, "after")
    finally:
        tier.close()


def test_a_hung_server_costs_at_most_its_timeout(fresh_single: Callable[..., LocalServers],
                                                 config_for: RemoteConfigFor) -> None:
    servers = fresh_single()
    tier = RemoteTier(config_for(servers), LAYOUT)
    try:
        store_and_check(tier, "hung")
        servers.pause(0)
        found, took_s = timed(lambda: tier.locate([key(0, "hung")]))
        assert found == [False] and took_s < BOUND_S and not tier.up
        assert read(tier, key(0, "hung")) is None
        servers.resume(0)
        wait_until(lambda: tier.up)
        assert torch.equal(read(tier, key(0, "hung")), payload(0))  # type: ignore[arg-type]
    finally:
        tier.close()


def test_a_reply_trickled_a_byte_at_a_time_costs_at_most_the_timeout(config_for: RemoteConfigFor) -> None:
    # Each byte comes within the socket's timeout (0.5 s), the whole reply only after 6 s: a slow-loris server.
    def trickle(command: list[bytes]) -> Iterator[bytes]:
        yield b"$60\r\n"
        for _ in range(60):
            time.sleep(0.1)
            yield b"x"
        yield b"\r\n"

    server = ScriptedServer(trickle)
    tier = RemoteTier(config_for(LocalServers("single", "/nonexistent"), urls=(server.url,)), LAYOUT)
    try:
        assert tier.up
        found, took_s = timed(lambda: tier.locate([key(0)]))
        assert found == [False] and took_s < BOUND_S and not tier.up
        wait_until(lambda: tier.up)
        dst = torch.zeros(LAYOUT.block_bytes, dtype=torch.uint8)
        resolved, took_s = timed(lambda: tier.submit_read(key(0), dst).result(10))
        assert resolved is False and took_s < BOUND_S
        wait_until(lambda: tier.up)
        assert tier.offer(key(1), payload(1))
        _, took_s = timed(tier.close)
        assert took_s < BOUND_S
    finally:
        tier.close()
        server.stop()


def test_close_answers_the_reads_still_queued_as_misses_instead_of_reading_them(config_for: RemoteConfigFor) -> None:
    def slow(command: list[bytes]) -> Iterator[bytes]:
        time.sleep(0.3)  # within the timeout: a slow server, not a faulty one
        yield b"$0\r\n\r\n"

    server = ScriptedServer(slow)
    config = config_for(LocalServers("single", "/nonexistent"), urls=(server.url,), batch_bytes=1)
    tier = RemoteTier(config, LAYOUT)
    try:
        futures = [tier.submit_read(key(i), torch.zeros(LAYOUT.block_bytes, dtype=torch.uint8)) for i in range(30)]
        _, took_s = timed(tier.close)
        assert took_s < BOUND_S and all(future.result(0) is False for future in futures)
        assert tier.stats(0).detail["misses"] == 30
    finally:
        tier.close()
        server.stop()


def test_a_full_server_answers_oom_and_the_tier_stays_up(fresh_single: Callable[..., LocalServers],
                                                        config_for: RemoteConfigFor) -> None:
    servers = fresh_single(maxmemory="3mb", policy="noeviction")
    tier = RemoteTier(config_for(servers), BIG)
    try:
        keys = [key(i, "oom") for i in range(200)]  # 6.4 MiB of blocks
        for i, k in enumerate(keys):
            tier.offer(k, payload(i, BIG.block_bytes))
        tier.flush()
        detail = tier.stats(0).detail
        assert detail["oom_errors"] > 0 and detail["blocks_written"] > 0 and tier.up
        stored = tier.locate(keys)
        assert sum(stored) == detail["blocks_written"]
        for i, k in enumerate(keys):
            got = read(tier, k)
            assert (got is not None) == stored[i]
            assert got is None or torch.equal(got, payload(i, BIG.block_bytes))
    finally:
        tier.close()


def test_a_slot_moved_to_another_node_is_followed(fresh_cluster: LocalServers, config_for: RemoteConfigFor) -> None:
    tier = RemoteTier(config_for(fresh_cluster), LAYOUT)
    try:
        store_and_check(tier, "moved", count=4)
        k = key(0, "moved")
        server_key = tier.server_key(k)
        clients = [fresh_cluster.client(i) for i in range(3)]
        slot = int(clients[0].execute_command("CLUSTER", "KEYSLOT", server_key))
        ids = [client.execute_command("CLUSTER", "MYID") for client in clients]
        ids = [node_id.decode() if isinstance(node_id, bytes) else node_id for node_id in ids]
        source = next(i for i, client in enumerate(clients)
                      if client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
        target = (source + 1) % 3
        clients[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        clients[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        moving = clients[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        clients[source].execute_command("MIGRATE", "127.0.0.1", fresh_cluster.ports[target], "", 0, 5000,
                                        "KEYS", *moving)
        for client in clients:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        assert clients[target].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(moving)
        assert tier.locate([k]) == [True]
        assert torch.equal(read(tier, k), payload(0))  # type: ignore[arg-type]
        store_and_check(tier, "moved-after", count=4)
        for client in clients:
            client.close()
    finally:
        tier.close()
