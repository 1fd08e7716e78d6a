"""The store over the tier chain with a remote tier: two stores (two hosts) share blocks through real
servers, lookups report the nearest tier, and a remote tier that goes away costs the store nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from kvtier import DiskConfig, HostConfig, KVLayout, Store, StoreConfig, Tier, TransferConfig
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)  # 1 KiB


def blocks(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.block_shape, generator=generator) for _ in range(count)]


StoreMaker = Callable[..., Store]


@pytest.fixture
def make_store() -> Iterator[StoreMaker]:
    stores: list[Store] = []

    def make(remote: Any = None, *, num_slots: int = 16, disk: DiskConfig | None = None) -> Store:
        config = StoreConfig(host=HostConfig(capacity_bytes=num_slots * 4096, policy="lru"),
                             transfer=TransferConfig(backend="cpu"), disk=disk or DiskConfig(),
                             **({"remote": remote} if remote is not None else {}))
        store = Store(LAYOUT, config)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def restore(store: Store, keys: list[bytes]) -> list[torch.Tensor]:
    out = [torch.zeros(LAYOUT.block_shape) for _ in keys]
    result = store.get(keys, out).wait(10)
    assert result.ok, result
    return out


def test_a_prefix_stored_on_one_host_is_restored_byte_identical_on_another(
        servers: LocalServers, config_for: RemoteConfigFor, make_store: StoreMaker) -> None:
    remote = config_for(servers)
    first, second = make_store(remote), make_store(remote)
    keys = first.hasher("m").keys(list(range(8 * 4)))
    saved = blocks(8, seed=1)
    assert first.put(keys, saved).wait(10).ok
    first.flush()
    # Write-through lent the host slots to the remote tier; sent, they are all released.
    assert first.stats().tiers["host"].detail["pinned_blocks"] == 0
    found = second.lookup(keys)
    assert found.num_blocks == 8 and found.tiers == (Tier.REMOTE,) * 8
    assert all(torch.equal(a, b) for a, b in zip(restore(second, keys), saved, strict=True))
    assert second.lookup(keys).tiers == (Tier.HOST,) * 8  # promoted
    tiers = second.stats().tiers
    assert tiers["remote"].hit_blocks == 8 and tiers["remote"].detail["hits"] == 8
    assert tiers["host"].detail["promoted_blocks"] == 8
    # Another tenant's hasher gives other keys: nothing shared.
    assert second.lookup(second.hasher("m", tenant_salt="other").keys(list(range(8 * 4)))).num_blocks == 0


def test_lookups_report_the_nearest_tier_and_stop_at_the_first_gap(
        redis_single: LocalServers, config_for: RemoteConfigFor, make_store: StoreMaker, tmp_path: Path) -> None:
    remote = config_for(redis_single)
    writer = make_store(remote)
    disk = DiskConfig(paths=(str(tmp_path / "disk"),), capacity_bytes=1 << 20, region_bytes=64 << 10,
                      write_mode="through", admission="admit_all")
    reader = make_store(remote, num_slots=4, disk=disk)
    keys = writer.hasher("m").keys(list(range(12 * 4)))
    saved = blocks(12, seed=2)
    assert writer.put(keys[:10], saved[:10]).wait(10).ok  # the remote has 0..9
    writer.flush()
    assert reader.put(keys[:2], saved[:2]).wait(10).ok  # the reader's host and disk have 0..1
    reader.flush()
    assert reader.put(keys[11:], saved[11:]).wait(10).ok  # 11 everywhere on the reader; 10 nowhere
    found = reader.lookup(keys, prefetch=False)
    assert found.num_blocks == 10
    assert found.tiers[:2] == (Tier.HOST,) * 2 and found.tiers[2:] == (Tier.REMOTE,) * 8
    # Evicted from the 4-slot host pool, blocks 0..1 are found on disk, the nearer tier.
    assert reader.put(keys[2:5], saved[2:5]).wait(10).ok
    found = reader.lookup(keys[:2], prefetch=False)
    assert Tier.DISK in found.tiers and Tier.REMOTE not in found.tiers


def test_write_back_sends_only_evicted_blocks(redis_single: LocalServers, config_for: RemoteConfigFor,
                                              make_store: StoreMaker) -> None:
    remote = config_for(redis_single, write_mode="back")
    store, other = make_store(remote, num_slots=4), make_store(remote)
    keys = store.hasher("m").keys(list(range(6 * 4)))
    saved = blocks(6, seed=3)
    assert store.put(keys[:4], saved[:4]).wait(10).ok
    store.flush()
    assert other.lookup(keys[:4]).num_blocks == 0
    assert store.put(keys[4:], saved[4:]).wait(10).ok  # evicts the two oldest
    store.flush()
    assert other.lookup(keys[:2]).tiers == (Tier.REMOTE,) * 2
    assert all(torch.equal(a, b) for a, b in zip(restore(other, keys[:2]), saved[:2], strict=True))
    assert store.stats().tiers["host"].detail["demoted_blocks"] == 2


def test_a_store_whose_remote_went_away_keeps_serving_from_its_host(
        fresh_single: Callable[..., LocalServers], config_for: RemoteConfigFor, make_store: StoreMaker) -> None:
    servers = fresh_single()
    store = make_store(config_for(servers))
    keys = store.hasher("m").keys(list(range(4 * 4)))
    saved = blocks(4, seed=4)
    assert store.put(keys[:2], saved[:2]).wait(10).ok
    servers.kill(0)
    started = time.monotonic()
    assert store.lookup(keys).num_blocks == 2  # host hits; the remote's failure is a miss
    assert store.lookup(keys).num_blocks == 2
    assert time.monotonic() - started < 2.0
    assert store.put(keys[2:], saved[2:]).wait(10).ok
    assert all(torch.equal(a, b) for a, b in zip(restore(store, keys), saved, strict=True))
    remote = store.stats().tiers["remote"].detail
    assert remote["up"] is False and remote["faults"] >= 1
    store.flush()  # the last put's blocks may still be in the write-through queue
    assert store.stats().tiers["host"].detail["pinned_blocks"] == 0  # nothing stays lent to a dead server


def test_the_remote_tier_is_set_from_toml_and_overrides(redis_single: LocalServers) -> None:
    from kvtier.config import load_config

    config = load_config(None, {"remote.urls": f'["{redis_single.urls[0]}"]', "remote.timeout_ms": "250",
                                "remote.write_mode": "back", "remote.password": "", "remote.tls": "false"})
    assert config.remote.urls == redis_single.urls and config.remote.timeout_ms == 250
    assert load_config(None, {"remote.urls": redis_single.urls[0]}).remote.urls == redis_single.urls
    with Store(LAYOUT, StoreConfig(host=HostConfig(capacity_bytes=8 * 4096), remote=config.remote)) as store:
        assert store.stats().tiers["remote"].detail["up"] is True
