"""The remote tier against real servers (a single one and a 3-master cluster): round trips, the value
format's checks, namespaces, the bounded write queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import torch
from remote_blocks import block_key, random_block, read_block

from kvtier.config import RemoteConfig
from kvtier.disk.format import HEADER_BYTES, MAGIC
from kvtier.errors import ClosedError, ConfigError, InvalidInputError
from kvtier.layout import KVLayout
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4)  # 512 B


def key(i: int, space: str = "tier") -> bytes:
    return block_key(i, space)


def payload(i: int, nbytes: int = LAYOUT.block_bytes) -> torch.Tensor:
    return random_block(i, nbytes)


def read(tier: RemoteTier, k: bytes, timeout: float = 5) -> torch.Tensor | None:
    return read_block(tier, k, timeout)


@pytest.fixture
def tier(servers: LocalServers, config_for: RemoteConfigFor) -> Iterator[RemoteTier]:
    with_tier = RemoteTier(config_for(servers), LAYOUT)
    yield with_tier
    with_tier.close()


def raw_client(servers: LocalServers, tier: RemoteTier, k: bytes):  # type: ignore[no-untyped-def]
    """A plain client of the node that owns ``k``'s server key."""
    from redis.cluster import ClusterNode, RedisCluster

    if servers.mode == "single":
        return servers.client()
    return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in servers.ports])


def test_blocks_written_by_one_tier_are_read_byte_identical_by_another(
        servers: LocalServers, config_for: RemoteConfigFor) -> None:
    config = config_for(servers)
    writer, reader = RemoteTier(config, LAYOUT), RemoteTier(config, LAYOUT)
    try:
        keys = [key(i) for i in range(40)]
        assert all(writer.offer(k, payload(i)) for i, k in enumerate(keys))
        writer.flush()
        assert reader.locate([*keys, key(99)]) == [True] * 40 + [False]
        futures = []
        dsts = [torch.zeros(LAYOUT.block_bytes, dtype=torch.uint8) for _ in keys]
        for k, dst in zip(keys, dsts, strict=True):
            futures.append(reader.submit_read(k, dst))
        assert all(future.result(5) for future in futures)
        assert all(torch.equal(dst, payload(i)) for i, dst in enumerate(dsts))
        assert read(reader, key(99)) is None
        stats = reader.stats(hit_blocks=0).detail
        assert stats["hits"] == 40 and stats["misses"] == 1 and stats["up"] is True
        assert writer.stats(0).detail["blocks_written"] == 40
    finally:
        writer.close()
        reader.close()


def test_a_lookup_of_64_keys_is_one_request_per_node(servers: LocalServers, tier: RemoteTier) -> None:
    keys = [key(i, "rt") for i in range(64)]
    tier.locate(keys)  # connections open on first use with a handshake of their own
    before = tier.requests.sent
    assert tier.locate(keys) == [False] * 64
    assert tier.requests.sent - before == len(servers.nodes)  # 64 keys hash to every node of the cluster


def test_the_server_key_carries_prefix_and_layout_and_the_value_the_entry_header(
        servers: LocalServers, tier: RemoteTier) -> None:
    k = key(1, "fmt")
    tier.offer(k, payload(1))
    tier.flush()
    server_key = tier.server_key(k)
    assert server_key == f"{tier.config.key_prefix}:{LAYOUT.fingerprint}:{k.hex()}".encode()
    value = raw_client(servers, tier, k).get(server_key)
    assert value[:4] == MAGIC and len(value) == HEADER_BYTES + LAYOUT.block_bytes
    assert value[HEADER_BYTES:] == payload(1).numpy().tobytes()


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "garbage", "other_key",
                                    "other_block_size"])
def test_a_damaged_or_foreign_value_is_a_counted_miss_never_data(
        servers: LocalServers, tier: RemoteTier, damage: str) -> None:
    k, other = key(2, damage), key(3, damage)
    tier.offer(k, payload(2))
    tier.offer(other, payload(3))
    tier.flush()
    client = raw_client(servers, tier, k)
    value = bytearray(client.get(tier.server_key(k)))
    if damage == "flip_payload":
        value[HEADER_BYTES + 7] ^= 1
    elif damage == "flip_header":
        value[6] ^= 0xFF
    elif damage == "truncate":
        value = value[: len(value) - 100]
    elif damage == "garbage":
        value = bytearray(b"not a kvtier value")
    elif damage == "other_key":
        value = bytearray(client.get(tier.server_key(other)))
    else:
        longer = RemoteTier(RemoteConfig(urls=tier.config.urls, mode=tier.config.mode, key_prefix="x"),
                            KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4))
        try:
            longer.offer(k, payload(2, longer.block_bytes))
            longer.flush()
            value = bytearray(raw_client(servers, tier, k).get(longer.server_key(k)))
        finally:
            longer.close()
    client.set(tier.server_key(k), bytes(value))
    assert read(tier, k) is None
    detail = tier.stats(0).detail
    foreign = damage in ("other_key", "other_block_size")
    assert detail["foreign_values" if foreign else "checksum_failures"] == 1
    assert torch.equal(read(tier, other), payload(3))  # type: ignore[arg-type]


def test_another_layout_or_prefix_never_sees_the_blocks(servers: LocalServers, tier: RemoteTier,
                                                       config_for: RemoteConfigFor) -> None:
    k = key(4, "ns")
    tier.offer(k, payload(4))
    tier.flush()
    other_layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4)
    others = [RemoteTier(tier.config, other_layout), RemoteTier(config_for(servers), LAYOUT)]
    try:
        for other in others:
            assert other.locate([k]) == [False]
            assert read(other, k) is None
    finally:
        for other in others:
            other.close()


def test_zstd_values_round_trip_and_any_tier_decodes_them(servers: LocalServers,
                                                           config_for: RemoteConfigFor) -> None:
    # The codec keeps a compressed value only when it saves a 4 KiB page (its rule on disk): a 32 KiB block.
    layout = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", block_tokens=4)
    config = config_for(servers, codec="zstd")
    writer = RemoteTier(config, layout)
    reader = RemoteTier(RemoteConfig(**{**vars(config), "codec": "none"}), layout)
    try:
        smooth = torch.zeros(layout.block_bytes, dtype=torch.uint8)
        smooth[::7] = 3
        writer.offer(key(5, "z"), smooth)
        writer.flush()
        assert writer.stats(0).bytes_written < layout.block_bytes // 4
        assert torch.equal(read(reader, key(5, "z")), smooth)  # type: ignore[arg-type]
    finally:
        writer.close()
        reader.close()


def test_a_full_queue_drops_offers_without_waiting(servers: LocalServers, config_for: RemoteConfigFor) -> None:
    config = config_for(servers, queue_bytes=3 * (HEADER_BYTES + LAYOUT.block_bytes))
    tier = RemoteTier(config, LAYOUT)
    try:
        servers.pause(0)  # the writer blocks on the first batch; later offers find the queue full
        started = time.monotonic()
        taken = [tier.offer(key(i, "q"), payload(i)) for i in range(20)]
        assert time.monotonic() - started < 0.5
        assert not all(taken) and tier.stats(0).detail["queue_full_dropped"] >= 1
    finally:
        servers.resume(0)
        tier.close()


def test_offers_of_held_or_queued_keys_are_not_sent_again(tier: RemoteTier) -> None:
    k = key(6, "dup")
    assert tier.offer(k, payload(6)) and tier.offer(k, payload(6))
    tier.flush()
    assert tier.offer(k, payload(6)) and tier.contains(k)
    detail = tier.stats(0).detail
    assert detail["blocks_written"] == 1 and detail["offers_deduplicated"] == 2


def test_bad_arguments_and_settings_raise_typed_errors(tier: RemoteTier) -> None:
    with pytest.raises(InvalidInputError):
        tier.offer(key(7), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(InvalidInputError):
        tier.offer(b"short", payload(7))
    with pytest.raises(InvalidInputError):
        tier.submit_read(key(7), torch.zeros(3, dtype=torch.float32))
    for bad in ({"urls": ("http://x",)}, {"urls": ("redis://x",), "mode": "sharded"},
                {"urls": ("redis://x",), "queue_bytes": 0}, {"urls": ("redis://x",), "key_prefix": "a b"},
                {"urls": ("redis://x",), "reconnect_min_ms": 10, "reconnect_max_ms": 5}):
        with pytest.raises(ConfigError):
            RemoteConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RemoteTier(RemoteConfig(), LAYOUT)
    tier.close()
    tier.close()
    with pytest.raises(ClosedError):
        tier.offer(key(7), payload(7))
    assert tier.stats(0).name == "remote"

