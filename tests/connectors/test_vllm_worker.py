"""The vLLM connector's worker side on CPU tensors laid out by vLLM's own KV cache allocator.

Saves pages from some block ids, loads them into others (bytes identical), layer by layer in order, for
layer-compact and block-outermost layouts, one or two vLLM blocks per kvtier block; failed loads are
reported and never scattered; a cache kvtier cannot read as pages is refused with a clear error. Synchronous
loads are in place when ``start_load_kv`` returns (before any layer hook).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, SupportsHMA  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from kvtier.config import HostConfig, StoreConfig, TransferConfig  # noqa: E402
from kvtier.daemon import Client  # noqa: E402
from kvtier.daemon.stats_cmd import fetch  # noqa: E402
from kvtier.errors import ConfigError, LayoutMismatchError  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.store import Lease, Store  # noqa: E402
from kvtier_connectors.vllm import KvtierConnector  # noqa: E402
from kvtier_connectors.vllm.engine_store import engine_socket_path  # noqa: E402
from kvtier_connectors.vllm.metadata import KvtierMetadata  # noqa: E402
from kvtier_connectors.vllm.settings import (  # noqa: E402
    ChunkKeys,
    ConnectorSettings,
    VllmGeometry,
    adopt_store,
    layout_from_kv_cache_config,
)
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec, Verdict  # noqa: E402

BLOCK = 16
NUM_BLOCKS = 32
LAYERS = ("layers.0.attn", "layers.1.attn", "layers.2.attn")
HEADS, HEAD_DIM = 2, 8
_instances = itertools.count()


def make_kv_cache_config(layout: KVCacheLayout) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16)
    page = spec.page_size_bytes
    if layout.is_layer_compact:
        layer_stride, block_stride = page * NUM_BLOCKS, page
    else:
        layer_stride, block_stride = page, page * len(LAYERS)
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=list(LAYERS),
                                        layer_stride=layer_stride, block_stride=block_stride)],
        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        kv_cache_layout=layout.name,
    )


def vllm_config_for(extra: dict[str, Any], tp_size: int = 1, executor: str = "uni", pp_size: int = 1) -> Any:
    """What a worker-side connector reads of a ``VllmConfig`` (a whole one needs a model on disk)."""
    return SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_connectors.vllm",
            kv_role="kv_both", kv_connector_extra_config=extra),
        model_config=SimpleNamespace(model="tiny-test-model", get_total_num_kv_heads=lambda: HEADS * tp_size),
        speculative_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size,
                                        distributed_executor_backend=executor),
        kv_events_config=None,
    )


class Worker:
    def __init__(self, layout: KVCacheLayout, block_tokens: int = BLOCK) -> None:
        self.kv_cache_config = make_kv_cache_config(layout)
        kv_layout, _ = layout_from_kv_cache_config(self.kv_cache_config, block_tokens)
        instance = f"worker-test-{next(_instances)}"
        self.store = Store(kv_layout, StoreConfig(host=HostConfig(capacity_bytes=4 << 20),
                                                  transfer=TransferConfig(backend="cpu")))
        adopt_store(instance, self.store)
        self.connector = KvtierConnector(vllm_config_for({"instance": instance, "block_tokens": block_tokens}),
                                         KVConnectorRole.WORKER, self.kv_cache_config)
        self.kv_caches = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), layout)
        generator = torch.Generator().manual_seed(0)
        for cache in self.kv_caches.values():
            cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
        self.connector.register_kv_caches(self.kv_caches)

    def save(self, spec: SaveSpec) -> None:
        self.connector.bind_connector_metadata(KvtierMetadata(saves=[spec]))
        self.connector.start_load_kv(None)  # type: ignore[arg-type]
        for name in LAYERS:
            self.connector.wait_for_layer_load(name)
            self.connector.save_kv_layer(name, self.kv_caches[name], None)
        self.connector.wait_for_save()
        self.connector.clear_connector_metadata()
        sent, _ = self.connector.get_finished({spec.req_id})
        assert sent is None  # saves never hold a request
        # The scheduler side's verdict on the step (no load failed under it): its chunks are committed.
        assert self.connector.worker_side is not None
        self.connector.worker_side.settle([Verdict(0)])

    def wait_received(self, req_ids: set[str], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            _, received = self.connector.get_finished(set())
            if received == req_ids:
                return
            assert time.monotonic() < deadline, f"{req_ids} not reported within {timeout_s} s"
            time.sleep(0.005)

    def pages(self, name: str, block_ids: list[int]) -> torch.Tensor:
        return self.kv_caches[name][block_ids].clone()


def fake_hashes(count: int, seed: int = 0) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(count))


@pytest.fixture(params=[KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, KVCacheLayout.BLNHC], ids=lambda p: p.name)
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    worker = Worker(request.param)
    yield worker
    worker.connector.shutdown()


def test_saved_pages_load_into_other_blocks_before_the_forward(worker: Worker) -> None:
    source, target = [3, 7, 1], [10, 11, 12]
    expected = {name: worker.pages(name, source) for name in LAYERS}
    hashes = fake_hashes(3)
    worker.save(SaveSpec("a", hashes, tuple(source)))
    assert worker.store.stats().put_blocks == 3

    worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, tuple(target), 0, False)]))
    worker.connector.start_load_kv(None)  # type: ignore[arg-type]
    for name in LAYERS:
        assert torch.equal(worker.pages(name, target), expected[name])
    worker.connector.wait_for_save()
    worker.connector.clear_connector_metadata()
    assert worker.connector.get_block_ids_with_load_errors() == set()


def test_a_chunk_of_two_vllm_blocks_restores_a_window_of_pages() -> None:
    worker = Worker(KVCacheLayout.LBNHC, block_tokens=2 * BLOCK)
    try:
        hashes = fake_hashes(2, seed=1)
        worker.save(SaveSpec("a", hashes, (3, 7, 1, 5)))
        expected = {name: worker.pages(name, [7, 1, 5]) for name in LAYERS}
        # vLLM already holds the first page of chunk 0: pages 1, 2, 3 go to blocks 20, 21, 22.
        worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, (20, 21, 22), 1, False)]))
        worker.connector.start_load_kv(None)  # type: ignore[arg-type]
        worker.connector.wait_for_save()
        worker.connector.clear_connector_metadata()
        for name in LAYERS:
            assert torch.equal(worker.pages(name, [20, 21, 22]), expected[name])
    finally:
        worker.connector.shutdown()


def test_an_async_load_is_reported_when_its_pages_are_in_place(worker: Worker) -> None:
    hashes = fake_hashes(2, seed=2)
    worker.save(SaveSpec("a", hashes, (4, 5)))
    expected = {name: worker.pages(name, [4, 5]) for name in LAYERS}
    worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, (14, 15), 0, True)]))
    worker.connector.start_load_kv(None)  # type: ignore[arg-type]
    worker.connector.wait_for_save()
    worker.connector.clear_connector_metadata()
    worker.wait_received({"b"})
    for name in LAYERS:
        assert torch.equal(worker.pages(name, [14, 15]), expected[name])


def test_a_failed_chunk_is_reported_and_not_scattered(worker: Worker) -> None:
    hashes = fake_hashes(3, seed=3)
    worker.save(SaveSpec("a", hashes[:1] + hashes[2:], (2, 6)))
    before = {name: worker.pages(name, [21]) for name in LAYERS}
    # Chunk 1 was never stored (evicted, say, between the scheduler's lookup and the load).
    worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, (20, 21, 22), 0, False)]))
    worker.connector.start_load_kv(None)  # type: ignore[arg-type]
    worker.connector.wait_for_save()
    worker.connector.clear_connector_metadata()
    # KV after a missing chunk is useless to vLLM (it recomputes from the first failure): 22 is reported too.
    assert worker.connector.get_block_ids_with_load_errors() == {21, 22}
    assert worker.connector.get_block_ids_with_load_errors() == set()
    for name in LAYERS:
        assert torch.equal(worker.pages(name, [21]), before[name])
        assert torch.equal(worker.pages(name, [20]), worker.pages(name, [2]))


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_lease_from_before_a_daemon_restart_fails_its_blocks_and_scatters_nothing(
        worker: Worker, monkeypatch: pytest.MonkeyPatch, is_async: bool) -> None:
    hashes = fake_hashes(2, seed=4)
    worker.save(SaveSpec("a", hashes, (2, 6)))
    before = {name: worker.pages(name, [30, 31]) for name in LAYERS}
    acquire = worker.store.acquire

    def acquire_then_restart(keys: Any, timeout: float | None = None) -> Lease:
        lease = acquire(keys, timeout)
        return dataclasses.replace(lease, generation="an-arena-of-a-daemon-that-restarted")

    monkeypatch.setattr(worker.store, "acquire", acquire_then_restart)
    worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, (30, 31), 0, is_async)]))
    worker.connector.start_load_kv(None)  # type: ignore[arg-type]
    worker.connector.wait_for_save()
    worker.connector.clear_connector_metadata()
    if is_async:
        worker.wait_received({"b"})
    assert worker.connector.get_block_ids_with_load_errors() == {30, 31}
    for name in LAYERS:
        assert torch.equal(worker.pages(name, [30, 31]), before[name])
    assert worker.store.stats().tiers["host"].detail["pinned_blocks"] == 0  # the lease was released


def test_a_cache_that_is_not_pages_on_a_block_dimension_is_refused(worker: Worker) -> None:
    caches = dict(worker.kv_caches)
    name = LAYERS[1]
    caches[name] = caches[name].transpose(0, 2)
    with pytest.raises(LayoutMismatchError, match=name):
        worker.connector.register_kv_caches(caches)
    caches[name] = torch.zeros(NUM_BLOCKS, HEADS, BLOCK // 2, 2 * HEAD_DIM, dtype=torch.bfloat16)
    with pytest.raises(LayoutMismatchError, match="pages differ"):
        worker.connector.register_kv_caches(caches)


def test_a_kvtier_block_must_be_whole_vllm_blocks() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        layout_from_kv_cache_config(make_kv_cache_config(KVCacheLayout.LBNHC), BLOCK + 8)


def test_unknown_extra_config_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        KvtierConnector(vllm_config_for({"blok_tokens": 32}), KVConnectorRole.WORKER,
                        make_kv_cache_config(KVCacheLayout.LBNHC))



def test_older_releases_k_and_v_planes_on_a_leading_dim_of_two() -> None:
    worker = Worker(KVCacheLayout.LBNHC)
    try:
        # vLLM before the KVCacheLayout descriptors: (2, num_blocks, block_size, num_kv_heads, head_size).
        generator = torch.Generator().manual_seed(5)
        worker.kv_caches = {name: torch.randn(2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM, generator=generator)
                            .to(torch.bfloat16) for name in LAYERS}
        worker.connector.register_kv_caches(worker.kv_caches)
        hashes = fake_hashes(2, seed=6)
        worker.save(SaveSpec("a", hashes, (8, 9)))
        worker.connector.bind_connector_metadata(KvtierMetadata(loads=[LoadSpec("b", hashes, (30, 31), 0, False)]))
        worker.connector.start_load_kv(None)  # type: ignore[arg-type]
        worker.connector.wait_for_save()
        worker.connector.clear_connector_metadata()
        for cache in worker.kv_caches.values():
            assert torch.equal(cache[:, [30, 31]], cache[:, [8, 9]])
    finally:
        worker.connector.shutdown()


def test_options_that_change_the_kv_of_one_checkpoint_get_keys_of_their_own(tmp_path: Path) -> None:
    """The default ``model_id`` names the checkpoint's files; vLLM options change the KV those weights compute
    without changing a file (``--quantization fp8`` of a bf16 checkpoint, ``--hf-overrides``,
    ``--hf-config-path``): engines with and without them must not load each other's KV."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"w" * 100)

    def model_id(**options: Any) -> str:
        config = vllm_config_for({"instance": f"identity-{next(_instances)}",
                                  "config": {"host": {"capacity_bytes": "1MiB"}}})
        config.model_config.model = str(model)
        for name, value in options.items():
            setattr(config.model_config, name, value)
        connector = KvtierConnector(config, KVConnectorRole.WORKER, make_kv_cache_config(KVCacheLayout.LBNHC))
        connector.shutdown()
        return connector.settings.model_id

    plain = model_id()
    assert model_id(quantization=None, hf_overrides={}, hf_config_path=None) == plain
    changed = [model_id(quantization="fp8"), model_id(hf_overrides={"rope_theta": 1e6}),
               model_id(hf_config_path=str(tmp_path / "other"))]
    assert len({plain, *changed}) == 4, "an option that changes the KV kept the keys of the plain checkpoint"
    assert model_id(quantization="fp8") == changed[0]  # the same in every process of the engine


@pytest.mark.parametrize(("tp_size", "executor"), [(1, "ray"), (2, "ray"), (2, "external_launcher")])
def test_the_embedded_store_refuses_ranks_that_may_share_nothing(tp_size: int, executor: str) -> None:
    with pytest.raises(ConfigError, match="run `kvtier serve` on every host and set store='daemon'"):
        KvtierConnector(vllm_config_for({}, tp_size, executor), KVConnectorRole.WORKER,
                        make_kv_cache_config(KVCacheLayout.LBNHC))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_the_embedded_store_under_the_mp_executor_is_the_engines_private_daemon(tp_size: int) -> None:
    """vLLM's default engine on the CPU (and any tensor-parallel one) runs workers in processes of their own:
    the scheduler's connector and the workers' share the engine's private daemon, named by vLLM's instance id."""
    config = vllm_config_for({"instance": "mp-engine", "config": {"host": {"capacity_bytes": "4MiB"}}}, tp_size, "mp")
    config.instance_id = f"test-{os.getpid()}-{tp_size}"
    socket_path = engine_socket_path(config.instance_id, "mp-engine")
    connector = KvtierConnector(config, KVConnectorRole.SCHEDULER, make_kv_cache_config(KVCacheLayout.LBNHC))
    try:
        assert isinstance(connector.store, Client)
        assert fetch(f"unix:{socket_path}", StoreConfig())["stats"] is not None
    finally:
        connector.shutdown()
    assert not os.path.exists(socket_path), "the private daemon outlived the connector that started it"


@pytest.mark.parametrize("store", ["embedded", "daemon"])
def test_pipeline_parallelism_is_refused(store: str) -> None:
    with pytest.raises(ConfigError, match="pipeline_parallel_size"):
        KvtierConnector(vllm_config_for({"store": store}, pp_size=2), KVConnectorRole.WORKER,
                        make_kv_cache_config(KVCacheLayout.LBNHC))


def test_context_parallelism_is_refused() -> None:
    config = vllm_config_for({"store": "daemon"})
    config.parallel_config.decode_context_parallel_size = 2
    with pytest.raises(ConfigError, match="context parallelism"):
        KvtierConnector(config, KVConnectorRole.WORKER, make_kv_cache_config(KVCacheLayout.LBNHC))


def test_sliding_window_layers_are_stored_with_the_hybrid_manager_off() -> None:
    """Item 5: vLLM turns the hybrid manager off for a non-HMA connector; every layer then keeps all its
    tokens in a full-attention spec that still names the window, and kvtier stores it."""
    assert not issubclass(KvtierConnector, SupportsHMA)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16,
                             sliding_window=8)
    config = make_kv_cache_config(KVCacheLayout.LBNHC)
    config.kv_cache_groups = [KVCacheGroupSpec(list(LAYERS), spec)]
    layout, _ = layout_from_kv_cache_config(config, BLOCK)
    assert layout.num_layers == len(LAYERS)
    config.kv_cache_groups = [KVCacheGroupSpec(list(LAYERS), SlidingWindowSpec(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16, sliding_window=8))]
    with pytest.raises(ConfigError, match="disable-hybrid-kv-cache-manager"):
        layout_from_kv_cache_config(config, BLOCK)


def test_latent_kv_is_stored_once_for_every_rank() -> None:
    latent = KVLayout(num_layers=2, num_kv_heads=1, head_dim=64, dtype="bfloat16", block_tokens=BLOCK,
                      kind="latent")
    geometry = VllmGeometry(LAYERS[:2], BLOCK, BLOCK, NUM_BLOCKS, "default")
    settings = ConnectorSettings(model_id="m")
    ranks = [ChunkKeys(settings, latent, geometry, rank, 4) for rank in range(4)]
    assert len({keys.key(b"h" * 32) for keys in ranks}) == 1
    assert [keys.writer for keys in ranks] == [True, False, False, False]


@pytest.mark.parametrize("name", ["sync_load_bytes", "sync_disk_load_bytes"])
@pytest.mark.parametrize("value", [-1, "1GiB", 1.5, True])
def test_a_bad_sync_load_budget_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        ConnectorSettings.from_extra_config({name: value}, "m")


@pytest.mark.parametrize("name", ["scheduler_timeout_s", "worker_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0, "1s", True, float("inf")])
def test_a_bad_deadline_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        ConnectorSettings.from_extra_config({name: value}, "m")
