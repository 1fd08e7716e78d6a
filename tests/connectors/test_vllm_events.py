"""KV events of the vLLM connector under vLLM's real Scheduler: a ``BlockRemoved`` follows every announced chunk
the store evicts, once, with the embedded store and through a ``kvtier serve`` daemon (issue 18 item 6)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_vllm_engine import _instances, engines, make_engine, model_config, prompt, socket_path  # noqa: E402
from vllm.config import ModelConfig  # noqa: E402
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm_harness import BLOCK, Engine, make_kv_cache_config  # noqa: E402

from kvtier.config import HostConfig, StoreConfig, TransferConfig, config_from_mapping  # noqa: E402
from kvtier.daemon import Client  # noqa: E402
from kvtier.errors import KvtierError  # noqa: E402
from kvtier.store import Store  # noqa: E402
from kvtier_connectors.vllm.settings import layout_from_kv_cache_config  # noqa: E402

__all__ = ["engines", "model_config", "socket_path"]  # fixtures used here
NUM_SLOTS = 4


def record_events(engine: Engine) -> list[Any]:
    published: list[Any] = []
    engine.scheduler.kv_event_publisher.publish = published.append  # type: ignore[method-assign]
    return published


def cpu_events(published: list[Any], kind: type) -> list[Any]:
    return [event for batch in published for event in batch.events
            if isinstance(event, kind) and event.medium == "CPU"]


def chunk_keys(engine: Engine, request: Request, num_chunks: int) -> dict[bytes, Any]:
    """The store key of each of ``request``'s first chunks, to vLLM's hash of it (one hash block a chunk)."""
    connector = engine.scheduler.connector
    assert connector is not None and connector.scheduler_side is not None  # type: ignore[attr-defined]
    keys = connector.scheduler_side.rank_keys[0]  # type: ignore[attr-defined]
    assert keys.hashes_per_chunk == 1
    return {keys.key(keys.chunk_hash(request.block_hashes, c)): request.block_hashes[c] for c in range(num_chunks)}


def write_past_the_host_tier(engine: Engine, published: list[Any], contains: Any) -> None:
    """Save 3 + 3 chunks into 4 host slots; BlockRemoved names exactly the chunks no longer held, once."""
    first = engine.add("first", prompt(21, 3 * BLOCK + 1))
    engine.run_until_done(first)
    second = engine.add("second", prompt(22, 3 * BLOCK + 1))  # one at a time: a step's saves fit the slots
    engine.run_until_done(second)
    for _ in range(3):  # the verdict of the last save, then a step that reads the store's removals
        engine.step()
    stored = cpu_events(published, BlockStored)
    assert len(stored) == 6
    announced = chunk_keys(engine, first, 3) | chunk_keys(engine, second, 3)
    evicted = [block_hash for key, block_hash in announced.items() if contains(key) is None]
    assert len(evicted) == 6 - NUM_SLOTS
    removed = [h for event in cpu_events(published, BlockRemoved) for h in event.block_hashes]
    assert sorted(removed) == sorted(evicted)
    for _ in range(3):  # read again: nothing is announced twice
        engine.step()
    assert len([h for event in cpu_events(published, BlockRemoved) for h in event.block_hashes]) == len(evicted)


def test_block_removed_follows_an_eviction_from_the_embedded_store(model_config: ModelConfig,
                                                                    engines: list[Engine]) -> None:
    layout, _ = layout_from_kv_cache_config(make_kv_cache_config(), 0)
    probe = Store(layout, StoreConfig(host=HostConfig(capacity_bytes=1 << 20), transfer=TransferConfig(backend="cpu")))
    slot_bytes = probe.slot_bytes
    probe.close()
    store = Store(layout, StoreConfig(host=HostConfig(capacity_bytes=NUM_SLOTS * slot_bytes, policy="lru"),
                                      transfer=TransferConfig(backend="cpu")))
    engine = make_engine(model_config, store=store, kv_events=True)
    engines.append(engine)
    published = record_events(engine)
    write_past_the_host_tier(engine, published, store.contains)


def test_block_removed_follows_an_eviction_in_a_daemon(model_config: ModelConfig, engines: list[Engine],
                                                        socket_path: str) -> None:
    layout, _ = layout_from_kv_cache_config(make_kv_cache_config(), 0)
    pool = NUM_SLOTS * layout.block_bytes  # a block of this layout fills its page-rounded slot exactly
    daemon = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "serve", "--socket", socket_path, "--pool",
                               str(pool), "--no-disk", "--metrics-port", "0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        config = config_from_mapping({"daemon": {"connect": f"unix:{socket_path}"}})
        deadline = time.monotonic() + 60
        while True:
            try:
                probe = Client(layout, config)
                break
            except (KvtierError, OSError):
                assert time.monotonic() < deadline and daemon.poll() is None, "the daemon never answered"
                time.sleep(0.1)
        engine = make_engine(model_config, extra={"store": "daemon", "instance": f"daemon-{next(_instances)}",
                                                  "config": {"daemon": {"connect": f"unix:{socket_path}"}}},
                             kv_events=True)
        engines.append(engine)
        published = record_events(engine)
        write_past_the_host_tier(engine, published, probe.contains)
        probe.close()
    finally:
        daemon.terminate()
        daemon.wait(30)
