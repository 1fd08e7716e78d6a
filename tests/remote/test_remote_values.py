"""Values planted on real servers: crafted zstd frames never cost more than a block nor stop the readers, bad
values are deleted, forged values are refused when values are authenticated, a host sends again what the
servers lost, and a promotion that hangs never hangs ``acquire``."""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import torch
import zstandard
from remote_blocks import block_key, random_block, read_block

import kvtier.store
from kvtier import HostConfig, KVLayout, Store, StoreConfig, TransferConfig
from kvtier.disk.codec import ZstdCodec
from kvtier.disk.format import CODEC_NONE, CODEC_ZSTD, HEADER_BYTES, EntryHeader, checksum, pack_header
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

LAYOUT = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", block_tokens=4)  # 32 KiB
SECRET = "a shared secret of the trusted hosts"


key = block_key


def payload(i: int) -> torch.Tensor:
    return random_block(i, LAYOUT.block_bytes)


def read(tier: RemoteTier, k: bytes) -> torch.Tensor | None:
    return read_block(tier, k, 10)


def frame_declaring(nbytes: int) -> bytes:
    """A zstd frame whose header declares ``nbytes`` of content but which holds one byte (an RLE block)."""
    descriptor = (3 << 6) | (1 << 5)  # an 8-byte content size, single segment
    block = struct.pack("<I", (1 << 0) | (1 << 1) | (1 << 3))[:3] + b"\x00"  # last, RLE, size 1
    return struct.pack("<I", 0xFD2FB528) + bytes([descriptor]) + struct.pack("<Q", nbytes) + block


def planted(k: bytes, stored: bytes, codec: int = CODEC_ZSTD, raw_len: int = LAYOUT.block_bytes) -> bytes:
    """A value with an intact header and checksum over ``stored``: what anyone who can write to the servers
    can make (the checksum is no secret)."""
    value = bytearray(HEADER_BYTES + len(stored))
    value[HEADER_BYTES:] = stored
    pack_header(EntryHeader(k, codec, 2, len(stored), raw_len, checksum(stored)), memoryview(value))
    return bytes(value)


@pytest.fixture
def tier(redis_single: LocalServers, config_for: RemoteConfigFor) -> Iterator[RemoteTier]:
    with_tier = RemoteTier(config_for(redis_single, read_threads=1), LAYOUT)
    yield with_tier
    with_tier.close()


def test_the_codec_refuses_a_frame_declaring_another_size_before_allocating_it() -> None:
    codec = ZstdCodec(2)
    dst = memoryview(bytearray(LAYOUT.block_bytes))
    assert not codec.decode_into(memoryview(frame_declaring(64 << 30)), 2, dst)  # 64 GiB: MemoryError before
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(512 << 20))
    assert len(bomb) < 32 << 10
    tracemalloc.start()
    try:
        assert not codec.decode_into(memoryview(bomb), 2, dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * LAYOUT.block_bytes  # not the 512 MiB it declares
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1 << 20))
    assert not codec.decode_into(memoryview(unsized), 2, dst)  # no declared size: capped at the block


@pytest.mark.parametrize("stored", ["64GiB", "512MiB", "garbage"])
def test_a_crafted_frame_is_a_counted_miss_the_readers_survive_and_it_is_deleted(
        redis_single: LocalServers, tier: RemoteTier, stored: str) -> None:
    bad, good = key(0, stored), key(1, stored)
    tier.offer(good, payload(1))
    tier.flush()
    frames = {"64GiB": frame_declaring(64 << 30), "garbage": b"\x28\xb5\x2f\xfd" + bytes(60),
              "512MiB": zstandard.ZstdCompressor(level=1).compress(bytes(512 << 20))}
    client = redis_single.client()
    client.set(tier.server_key(bad), planted(bad, frames[stored]))
    assert tier.locate([bad]) == [True]
    for _ in range(2):  # one reader thread: a dead one would leave the second read unresolved
        assert read(tier, bad) is None
        assert torch.equal(read(tier, good), payload(1))  # type: ignore[arg-type]
    detail = tier.stats(0).detail
    assert detail["checksum_failures"] == 1 and detail["bad_values_deleted"] == 1
    assert client.exists(tier.server_key(bad)) == 0 and tier.locate([bad]) == [False]
    client.close()


def test_authenticated_values_refuse_forged_and_untagged_ones(redis_single: LocalServers,
                                                              config_for: RemoteConfigFor) -> None:
    config = config_for(redis_single, auth_secret=SECRET)
    writer, reader = RemoteTier(config, LAYOUT), RemoteTier(config, LAYOUT)
    stranger = RemoteTier(config_for(redis_single, key_prefix=config.key_prefix, auth_secret="another secret!!!"),
                          LAYOUT)
    plain = RemoteTier(config_for(redis_single, key_prefix=config.key_prefix), LAYOUT)
    client = redis_single.client()
    try:
        keys = [key(i, "auth") for i in range(4)]
        for i, k in enumerate(keys):
            writer.offer(k, payload(i))
        writer.flush()
        assert torch.equal(read(reader, keys[0]), payload(0))  # type: ignore[arg-type]
        # A value with an intact header and checksum, planted by someone without the secret.
        forged = planted(keys[1], payload(9).numpy().tobytes(), codec=CODEC_NONE)
        client.set(reader.server_key(keys[1]), forged)
        assert read(reader, keys[1]) is None
        assert reader.stats(0).detail["forged_values"] == 1 and client.exists(reader.server_key(keys[1])) == 0
        assert read(stranger, keys[2]) is None and stranger.stats(0).detail["forged_values"] == 1
        assert read(plain, keys[3]) is None and plain.stats(0).detail["checksum_failures"] == 1
    finally:
        for each in (writer, reader, stranger, plain):
            each.close()
        client.close()


def test_keyed_key_names_list_no_block_key(redis_single: LocalServers, config_for: RemoteConfigFor) -> None:
    config = config_for(redis_single, auth_secret=SECRET, hash_key_names=True)
    writer, reader = RemoteTier(config, LAYOUT), RemoteTier(config, LAYOUT)
    client = redis_single.client()
    try:
        k = key(0, "names")
        writer.offer(k, payload(0))
        writer.flush()
        names = [name for name in client.scan_iter(match=f"{config.key_prefix}:*")]
        assert names == [writer.server_key(k)] and k.hex().encode() not in names[0]
        assert reader.locate([k]) == [True] and torch.equal(read(reader, k), payload(0))  # type: ignore[arg-type]
    finally:
        writer.close()
        reader.close()
        client.close()


def test_a_host_sends_again_what_a_restarted_server_lost(fresh_single: Callable[..., LocalServers],
                                                         config_for: RemoteConfigFor) -> None:
    servers = fresh_single()
    tier = RemoteTier(config_for(servers), LAYOUT)
    try:
        k = key(0, "restart")
        assert tier.offer(k, payload(0))
        tier.flush()
        assert tier.offer(k, payload(0)) and tier.stats(0).detail["offers_deduplicated"] == 1
        servers.restart(0)  # empty again; the tier learns it from a broken connection or a new run_id
        deadline = time.monotonic() + 30
        while tier.stats(0).detail["known_blocks"] or not tier.up:
            assert time.monotonic() < deadline, "the tier never noticed the restart"
            time.sleep(0.05)
        assert tier.offer(k, payload(0))
        tier.flush()
        assert tier.stats(0).detail["blocks_written"] == 2 and tier.locate([k]) == [True]
    finally:
        tier.close()


def test_a_host_sends_again_what_the_server_evicted(fresh_single: Callable[..., LocalServers],
                                                    config_for: RemoteConfigFor) -> None:
    servers = fresh_single(maxmemory="4mb", policy="allkeys-lru")
    tier = RemoteTier(config_for(servers), LAYOUT)
    try:
        keys = [key(i, "lru") for i in range(400)]  # 12.5 MiB of values into 4 MiB
        for i, k in enumerate(keys):
            tier.offer(k, payload(i))
            if i % 50 == 49:
                tier.flush()
        tier.flush()
        lost = [k for k, held in zip(keys, tier.locate(keys), strict=True) if not held]
        assert lost
        written = tier.stats(0).detail["blocks_written"]
        first = keys[:5]
        time.sleep(1.5)  # the tier watches the servers' eviction count once a second
        for i, k in enumerate(first):
            assert tier.offer(k, payload(i))
        tier.flush()
        assert tier.stats(0).detail["blocks_written"] > written and tier.locate(first) == [True] * 5
    finally:
        tier.close()


def test_acquire_waits_for_a_hung_promotion_at_most_its_timeout(
        fresh_single: Callable[..., LocalServers], config_for: RemoteConfigFor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    servers = fresh_single()
    remote = config_for(servers, timeout_ms=5000)
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)  # 1 KiB
    config = StoreConfig(host=HostConfig(capacity_bytes=16 * 4096, policy="lru"),
                         transfer=TransferConfig(backend="cpu"), remote=remote)
    first, second = Store(layout, config), Store(layout, config)
    try:
        keys = first.hasher("m").keys(list(range(3 * 4)))
        first.put(keys, [torch.randn(layout.block_shape) for _ in keys]).wait(10)
        first.flush()
        tier = second.lower.get("remote")
        assert tier is not None and tier.locate(keys) == [True] * 3
        servers.pause(0)
        started = time.monotonic()
        lease = second.acquire(keys[:1], timeout=0.3)
        assert lease.keys == () and time.monotonic() - started < 2.5
        monkeypatch.setattr(kvtier.store, "PROMOTION_WAIT_S", 0.3)
        started = time.monotonic()
        lease = second.acquire(keys[1:2])
        assert lease.keys == () and time.monotonic() - started < 2.5
    finally:
        servers.resume(0)
        first.close()
        second.close()


def test_an_oversized_value_or_another_type_is_a_miss_received_bounded_and_deleted(
        redis_single: LocalServers, tier: RemoteTier) -> None:
    huge, listed, empty = key(0, "huge"), key(1, "huge"), key(2, "huge")
    client = redis_single.client()
    client.set(tier.server_key(huge), planted(huge, bytes(64 << 20), codec=CODEC_NONE))
    client.rpush(tier.server_key(listed), b"not a string")
    before = tier.stats(0).detail["bytes_read"]
    tracemalloc.start()
    try:
        assert read(tier, huge) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * LAYOUT.block_bytes  # not the 64 MiB stored
    assert read(tier, listed) is None and read(tier, empty) is None
    detail = tier.stats(0).detail
    assert detail["checksum_failures"] == 1 and detail["foreign_values"] == 1 and detail["bytes_read"] == before
    assert tier.locate([huge, listed, empty]) == [False] * 3 and detail["bad_values_deleted"] == 2
    client.close()
