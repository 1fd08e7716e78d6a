"""An engine for the vLLM connector's tests: vLLM's real Scheduler, the model runner mixin's call order, and a
fake forward whose KV depends on the KV before it.

``Engine.step`` does what vLLM 0.33's model runner does with a connector: bind the metadata; when the step
has synchronous loads, ``start_load_kv`` before the forward, else after it; per-layer hooks
(``wait_for_layer_load`` before a layer, ``save_kv_layer`` after it) only where a piecewise or eager forward
would call them, none in a full-graph replay (``graph_mode="full"`` always, ``"full_and_piecewise"`` for
uniform single-token batches, vLLM's default); then ``wait_for_save``, ``get_finished``,
``get_block_ids_with_load_errors``, the stats, and ``update_from_output`` with the connector's output.

The fake forward writes, for each scheduled token at position ``p`` of layer ``l``, the value
``(3 * kv[p - 1] + token + l) mod 65521`` read from the paged cache itself, so KV computed over a prefix that
is not in place (not loaded yet, or failed) differs from ``expected_kv``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from kvtier_connectors.vllm import KvtierConnector

BLOCK = 16
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
HEADS, HEAD_DIM = 2, 16
EOS = 999
MODULUS = 65521


def write_model_dir(path: Path) -> Path:
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": HEADS,
        "num_hidden_layers": len(LAYERS), "head_dim": HEAD_DIM, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "float32", "rms_norm_eps": 1e-5,
    }))
    return path


def make_vllm_config(model_config: ModelConfig, extra: dict[str, Any], *, policy: str = "recompute",
                     max_batched_tokens: int = 512, num_blocks: int = 64) -> VllmConfig:
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=max_batched_tokens,
                                         max_model_len=1024, is_encoder_decoder=False,
                                         enable_chunked_prefill=True),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_connectors.vllm",
            kv_role="kv_both", kv_connector_extra_config=extra, kv_load_failure_policy=policy,
        ),
        device_config=DeviceConfig("cpu"),
    )
    config.parallel_config.distributed_executor_backend = "uni"
    config.cache_config.num_gpu_blocks = num_blocks
    return config


def make_kv_cache_config(num_blocks: int = 64) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * len(LAYERS), layers=list(LAYERS),
                                        layer_stride=page, block_stride=page * len(LAYERS))],
        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        kv_cache_layout="BLNHC",
    )


def expected_kv(tokens: list[int], layer_index: int) -> list[int]:
    values, previous = [], 0
    for token in tokens:
        previous = (3 * previous + token + layer_index) % MODULUS
        values.append(previous)
    return values


class Engine:
    """vLLM's Scheduler, a worker-side connector and a fake forward over CPU KV tensors."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, graph_mode: str = "piecewise") -> None:
        self.scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(vllm_config),
                                   block_size=BLOCK)
        self.worker = KvtierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        layout = KVCacheLayout[kv_cache_config.kv_cache_layout]
        self.kv_caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
        self.worker.register_kv_caches(self.kv_caches)
        self.graph_mode = graph_mode
        self.load_errors: list[set[int]] = []
        self.finished_sending: set[str] = set()
        self.full_graph_steps = 0
        self.stats: list[dict[str, Any]] = []

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 2) -> Request:
        params = SamplingParams(max_tokens=max_tokens)
        params.update_from_generation_config({}, EOS)
        request = Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=params,
                          pooling_params=None, block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.scheduler.add_request(request)
        return request

    def _full_graph(self, output: Any) -> bool:
        counts = list(output.num_scheduled_tokens.values())
        uniform_decode = bool(counts) and all(count == 1 for count in counts)
        return self.graph_mode == "full" or (self.graph_mode == "full_and_piecewise" and uniform_decode)

    def step(self) -> Any:
        output = self.scheduler.schedule()
        worker = self.worker
        worker.bind_connector_metadata(output.kv_connector_metadata)
        if output.has_sync_kv_loads:
            worker.start_load_kv(None)  # type: ignore[arg-type]
        full_graph = self._full_graph(output)
        self.full_graph_steps += full_graph
        if output.num_scheduled_tokens:
            for layer_index, name in enumerate(LAYERS):
                if not full_graph:
                    worker.wait_for_layer_load(name)
                self._forward_layer(output, layer_index, name)
                if not full_graph:
                    worker.save_kv_layer(name, self.kv_caches[name], None)
        if not output.has_sync_kv_loads:
            worker.start_load_kv(None)  # type: ignore[arg-type]
        worker.wait_for_save()
        sending, recving = worker.get_finished(output.finished_req_ids)
        errors = worker.get_block_ids_with_load_errors()
        stats = worker.get_kv_connector_stats()
        if stats is not None:
            self.stats.append(stats.data)
        worker.clear_connector_metadata()
        self.load_errors.append(errors)
        self.finished_sending |= sending or set()
        req_ids = list(output.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            kv_connector_output=KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                                  invalid_block_ids=errors),
        )
        self.scheduler.update_from_output(output, runner_output)
        return output

    def _forward_layer(self, output: Any, layer_index: int, name: str) -> None:
        cache = self.kv_caches[name]
        for req_id, count in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            start = request.num_computed_tokens - count
            for position in range(start, start + count):
                previous = 0
                if position:
                    previous = int(cache[block_ids[(position - 1) // BLOCK], 0, (position - 1) % BLOCK, 0])
                token = request.all_token_ids[position]
                value = (3 * previous + token + layer_index) % MODULUS
                cache[block_ids[position // BLOCK], :, position % BLOCK, :] = float(value)

    def kv_of(self, req_id: str, num_tokens: int, layer_index: int) -> list[int]:
        """The KV values vLLM's blocks of ``req_id`` hold for its first ``num_tokens`` tokens."""
        cache = self.kv_caches[LAYERS[layer_index]]
        block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        return [int(cache[block_ids[p // BLOCK], 0, p % BLOCK, 0]) for p in range(num_tokens)]

    def run_until_done(self, *requests: Request, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(r.request_id in self.scheduler.requests for r in requests):
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still held after {timeout_s} s")
            self.step()
            time.sleep(0.002)

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()
