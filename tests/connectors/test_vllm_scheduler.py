"""The vLLM connector driven by vLLM's own Scheduler on the CPU, with a fake model that writes known KV.

Scenario (numbered as in the issue):
1. a request is scheduled, computed and finished; its chunks are saved (vLLM frees its blocks at once: the
   copies are queued ahead of any reuse);
2. vLLM's prefix cache is reset; a second request with the same prefix is admitted with the external hit
   counted, and its blocks hold the first request's KV, byte for byte;
3. a third request whose stored chunk is corrupt gets that chunk's blocks reported as load errors, and
   vLLM recomputes them;
4. with the prefix demoted to the disk tier, the load is asynchronous past ``sync_disk_load_bytes``: vLLM
   parks the request until the worker reports the blocks received, then schedules only the tokens past the
   hit; within it, the load is synchronous: the worker waits for the disk reads before the forward.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from kvtier.config import DiskConfig, HostConfig, StoreConfig, TransferConfig  # noqa: E402
from kvtier.job import Job  # noqa: E402
from kvtier.store import Lease, Store  # noqa: E402
from kvtier_connectors.vllm import KvtierConnector  # noqa: E402
from kvtier_connectors.vllm.settings import adopt_store, layout_from_kv_cache_config  # noqa: E402

BLOCK = 16
NUM_BLOCKS = 64
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
HEADS, HEAD_DIM = 2, 16
EOS = 999


class CorruptingStore(Store):
    """A store whose chosen keys fail their read, as a block that fails its checksum does."""

    corrupt: set[bytes]

    def acquire(self, keys: Any, timeout: float | None = None) -> Lease:
        keys = list(keys)
        cut = next((i for i, key in enumerate(keys) if key in self.corrupt), len(keys))
        return super().acquire(keys[:cut], timeout)

    def get(self, keys: Any, blocks: Any) -> Job:
        job = super().get(keys, blocks)
        job.fail(i for i, key in enumerate(keys) if key in self.corrupt)
        return job


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": HEADS,
        "num_hidden_layers": len(LAYERS), "head_dim": HEAD_DIM, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "float32", "rms_norm_eps": 1e-5,
    }))
    return path


@pytest.fixture(scope="module")
def model_config(model_dir: Path) -> ModelConfig:
    return ModelConfig(model=str(model_dir), dtype="float32", seed=0, skip_tokenizer_init=True)


def make_vllm_config(model_config: ModelConfig, extra: dict[str, Any]) -> VllmConfig:
    cache_config = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=1024,
                                         is_encoder_decoder=False),
        cache_config=cache_config,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_connectors.vllm",
            kv_role="kv_both", kv_connector_extra_config=extra, kv_load_failure_policy="recompute",
        ),
        device_config=DeviceConfig("cpu"),
    )
    # vLLM's CPU platform runs even one worker in a process of its own; on a GPU one worker shares the
    # scheduler's process ("uni"), which the embedded store needs and which this test's engine reproduces.
    config.parallel_config.distributed_executor_backend = "uni"
    return config


def make_kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=list(LAYERS),
                                        layer_stride=page * NUM_BLOCKS, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        kv_cache_layout="LBNHC",
    )


class Engine:
    """vLLM's real Scheduler plus a worker-side connector and a fake forward pass over CPU KV tensors."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(vllm_config),
                                   block_size=BLOCK)
        self.worker = KvtierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        self.kv_caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout.LBNHC)
        self.worker.register_kv_caches(self.kv_caches)
        self.load_errors: list[set[int]] = []
        self.finished_sending: set[str] = set()

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 2) -> Request:
        params = SamplingParams(max_tokens=max_tokens)
        params.update_from_generation_config({}, EOS)
        request = Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=params,
                          pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.scheduler.add_request(request)
        return request

    def step(self) -> Any:
        output = self.scheduler.schedule()
        # Read before update_from_output hands the stats to the logger and resets them.
        self.connector_stats = copy.deepcopy(self.scheduler.connector_prefix_cache_stats)
        self.worker.bind_connector_metadata(output.kv_connector_metadata)
        self.worker.start_load_kv(None)  # type: ignore[arg-type]
        for layer_index, name in enumerate(LAYERS):
            self.worker.wait_for_layer_load(name)
            self._forward_layer(output, layer_index, name)
            self.worker.save_kv_layer(name, self.kv_caches[name], None)
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(output.finished_req_ids)
        errors = self.worker.get_block_ids_with_load_errors()
        worker_meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
        self.load_errors.append(errors)
        self.finished_sending |= sending or set()
        req_ids = list(output.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            kv_connector_output=KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                                  invalid_block_ids=errors, kv_connector_worker_meta=worker_meta),
        )
        self.scheduler.update_from_output(output, runner_output)
        return output

    def _forward_layer(self, output: Any, layer_index: int, name: str) -> None:
        """Write KV for every scheduled token: a function of its token id, position and layer."""
        cache = self.kv_caches[name]
        for req_id, count in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            # The scheduler has already counted this step's tokens as computed.
            start = request.num_computed_tokens - count
            for position in range(start, start + count):
                token = request.all_token_ids[position]
                cache[block_ids[position // BLOCK], :, position % BLOCK, :] = kv_value(token, position, layer_index)

    def expected_block(self, tokens: list[int], block_index: int, layer_index: int) -> torch.Tensor:
        values = [kv_value(tokens[p], p, layer_index) for p in range(block_index * BLOCK, (block_index + 1) * BLOCK)]
        column = torch.tensor(values, dtype=torch.float32).view(1, BLOCK, 1)
        return column.expand(HEADS, BLOCK, 2 * HEAD_DIM)

    def run_until_done(self, request: Request, timeout_s: float = 10.0) -> None:
        """Step until vLLM let go of the request, then while the connector has saves to settle (as vLLM does)."""
        deadline = time.monotonic() + timeout_s
        connector = self.scheduler.connector
        while request.request_id in self.scheduler.requests or (connector and connector.has_pending_push_work()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{request.request_id} still held after {timeout_s} s")
            self.step()
            time.sleep(0.005)


def kv_value(token: int, position: int, layer_index: int) -> float:
    return float(token * 1000 + position) + 0.25 * layer_index


@pytest.fixture
def engine(model_config: ModelConfig) -> Iterator[Engine]:
    init_none_hash(sha256)
    kv_cache_config = make_kv_cache_config()
    layout, _ = layout_from_kv_cache_config(kv_cache_config, 0)
    store = CorruptingStore(layout, StoreConfig(host=HostConfig(capacity_bytes=4 << 20),
                                                transfer=TransferConfig(backend="cpu")))
    store.corrupt = set()
    adopt_store("scheduler-test", store)
    engine = Engine(make_vllm_config(model_config, {"instance": "scheduler-test"}), kv_cache_config)
    yield engine
    engine.worker.shutdown()
    engine.scheduler.shutdown()


def test_save_then_reset_then_load_then_corrupt(engine: Engine) -> None:
    prefix = [100 + i for i in range(5 * BLOCK)]
    store = engine.worker.store
    assert isinstance(store, CorruptingStore)

    # 1. Schedule, compute, finish; whole chunks are saved and no request is held for them.
    first = engine.add("first", [*prefix, 1, 2, 3])
    engine.run_until_done(first)
    assert not engine.finished_sending
    assert store.stats().put_blocks == 5

    # 2. Reset vLLM's prefix cache: the second request's hit is external, its blocks are loaded.
    assert engine.scheduler.reset_prefix_cache()
    second = engine.add("second", [*prefix, 4, 5])
    output = engine.step()
    assert output.num_scheduled_tokens["second"] == 2
    assert second.num_computed_tokens >= 5 * BLOCK
    block_ids = engine.scheduler.kv_cache_manager.get_block_ids("second")[0]
    for layer_index, name in enumerate(LAYERS):
        for block_index in range(5):
            actual = engine.kv_caches[name][block_ids[block_index]]
            assert torch.equal(actual, engine.expected_block(prefix, block_index, layer_index))
    assert engine.connector_stats is not None
    assert engine.connector_stats.hits == 5 * BLOCK
    engine.run_until_done(second)
    assert engine.load_errors[-1] == set()

    # 3. Chunk 2 of the prefix is corrupt: its block and those after it are reported and recomputed, never
    #    scattered.
    assert engine.scheduler.reset_prefix_cache()
    keys = engine.worker.worker_side.keys if engine.worker.worker_side else None
    assert keys is not None
    corrupt_key = keys.key(keys.chunk_hash(second.block_hashes, 2))
    store.corrupt.add(corrupt_key)
    third = engine.add("third", [*prefix, 6])
    engine.step()
    third_blocks = engine.scheduler.kv_cache_manager.get_block_ids("third")[0]
    assert engine.load_errors[-1] == set(third_blocks[2:5])
    # vLLM keeps the two chunks before the corrupt one and recomputes from there.
    assert third.num_computed_tokens == 2 * BLOCK
    engine.step()
    for layer_index, name in enumerate(LAYERS):
        assert torch.equal(engine.kv_caches[name][third_blocks[2]], engine.expected_block(prefix, 2, layer_index))
    engine.run_until_done(third)


@pytest.fixture
def disk_engine(model_config: ModelConfig, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine whose store's host tier holds 6 blocks over a disk tier; ``request.param``: more extra config."""
    init_none_hash(sha256)
    kv_cache_config = make_kv_cache_config()
    layout, _ = layout_from_kv_cache_config(kv_cache_config, 0)
    config = StoreConfig(
        host=HostConfig(capacity_bytes=6 * layout.block_bytes, policy="lru"),
        disk=DiskConfig(paths=(str(tmp_path),), capacity_bytes="16MiB", region_bytes="1MiB", admission="admit_all",
                        direct_io="off"),
        transfer=TransferConfig(backend="cpu"),
    )
    adopt_store("scheduler-disk-test", Store(layout, config))
    extra = {"instance": "scheduler-disk-test", **getattr(request, "param", {})}
    engine = Engine(make_vllm_config(model_config, extra), kv_cache_config)
    yield engine
    engine.worker.shutdown()
    engine.scheduler.shutdown()


def demote_a_prefix(engine: Engine) -> list[int]:
    """A prefix of 5 blocks computed and saved, then demoted to disk; vLLM's prefix cache reset."""
    store = engine.worker.store
    prefix = [300 + i for i in range(5 * BLOCK)]
    engine.run_until_done(engine.add("first", [*prefix, 1]))
    # Six other blocks fill the host tier: the prefix is demoted to disk.
    fillers = [bytes([0xF0, i]) * 8 for i in range(6)]
    filler_blocks = [torch.zeros(store.layout.block_numel) for _ in fillers]
    assert store.put(fillers, filler_blocks).wait(10).ok
    store.flush()
    assert engine.scheduler.reset_prefix_cache()
    return prefix


def assert_loaded(engine: Engine, req_id: str, prefix: list[int]) -> None:
    assert all(not errors for errors in engine.load_errors)
    block_ids = engine.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
    for layer_index, name in enumerate(LAYERS):
        for block_index in range(5):
            assert torch.equal(engine.kv_caches[name][block_ids[block_index]],
                               engine.expected_block(prefix, block_index, layer_index))


@pytest.mark.parametrize("disk_engine", [{"sync_disk_load_bytes": 0}], indirect=True)
def test_a_prefix_on_disk_past_the_budget_loads_asynchronously(disk_engine: Engine) -> None:
    engine = disk_engine
    prefix = demote_a_prefix(engine)
    second = engine.add("second", [*prefix, 2, 3])
    engine.step()
    assert second.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert engine.connector_stats is not None
    assert engine.connector_stats.hits == 5 * BLOCK
    assert engine.connector_stats.hits_by_source == {CacheHitSource.DISK: 5 * BLOCK}
    deadline = time.monotonic() + 10
    while True:
        output = engine.step()
        if "second" in output.num_scheduled_tokens:
            break
        assert time.monotonic() < deadline, "the asynchronous load was never reported"
        time.sleep(0.005)
    assert output.num_scheduled_tokens["second"] == 2
    assert_loaded(engine, "second", prefix)
    engine.run_until_done(second)


def test_a_prefix_on_disk_within_the_budget_loads_before_the_forward(disk_engine: Engine) -> None:
    """Issue 25: a disk hit within ``sync_disk_load_bytes`` is scheduled at once (no step parked waiting for
    it): the worker waits for the reads the lookup started, then the forward computes past the hit."""
    engine = disk_engine
    prefix = demote_a_prefix(engine)
    second = engine.add("second", [*prefix, 2, 3])
    output = engine.step()
    assert output.num_scheduled_tokens["second"] == 2
    assert engine.connector_stats is not None
    assert engine.connector_stats.hits_by_source == {CacheHitSource.DISK: 5 * BLOCK}
    assert_loaded(engine, "second", prefix)
    engine.run_until_done(second)


@pytest.fixture
def two_block_engine(model_config: ModelConfig) -> Iterator[Engine]:
    init_none_hash(sha256)
    kv_cache_config = make_kv_cache_config()
    layout, _ = layout_from_kv_cache_config(kv_cache_config, 2 * BLOCK)
    adopt_store("scheduler-two-block-test", Store(layout, StoreConfig(host=HostConfig(capacity_bytes=4 << 20),
                                                                      transfer=TransferConfig(backend="cpu"))))
    extra = {"instance": "scheduler-two-block-test", "block_tokens": 2 * BLOCK}
    engine = Engine(make_vllm_config(model_config, extra), kv_cache_config)
    yield engine
    engine.worker.shutdown()
    engine.scheduler.shutdown()


def test_a_local_hit_inside_a_kvtier_block_loads_only_the_pages_after_it(two_block_engine: Engine) -> None:
    engine = two_block_engine
    prefix = [500 + i for i in range(6 * BLOCK)]  # 3 kvtier blocks of 2 vLLM blocks each
    engine.run_until_done(engine.add("first", [*prefix, 1]))
    assert engine.worker.store.stats().put_blocks == 3
    assert engine.scheduler.reset_prefix_cache()
    # vLLM's own cache now holds the prefix's first vLLM block only (the rest of this prompt differs).
    engine.run_until_done(engine.add("other", [*prefix[:BLOCK], *([7] * 2 * BLOCK)]))

    second = engine.add("second", [*prefix, 2, 3])
    output = engine.step()
    assert engine.connector_stats is not None
    assert engine.connector_stats.hits == 5 * BLOCK
    assert output.num_scheduled_tokens["second"] == 2
    block_ids = engine.scheduler.kv_cache_manager.get_block_ids("second")[0]
    for layer_index, name in enumerate(LAYERS):
        for block_index in range(6):
            assert torch.equal(engine.kv_caches[name][block_ids[block_index]],
                               engine.expected_block(prefix, block_index, layer_index))
    engine.run_until_done(second)
