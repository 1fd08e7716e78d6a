"""An engine for the vLLM connector's tests: vLLM's real Scheduler, the model runner mixin's call order, and a
fake forward whose KV depends on the KV before it.

``Engine.step`` does what vLLM 0.33's model runner does with a connector: bind the metadata; when the step
has synchronous loads, ``start_load_kv`` before the forward, else after it; per-layer hooks
(``wait_for_layer_load`` before a layer, ``save_kv_layer`` after it) only where a piecewise or eager forward
would call them, none in a full-graph replay (``graph_mode="full"`` always, ``"full_and_piecewise"`` for
uniform single-token batches, vLLM's default); then ``wait_for_save``, ``get_finished``,
``get_block_ids_with_load_errors``, the stats, ``build_connector_worker_meta``, and ``update_from_output``
with the connector's output, merged over the ranks by vLLM's ``KVOutputAggregator``.

``async_scheduling=True`` runs vLLM's ``AsyncScheduler`` as the engine core's batch queue does: step t+1 is
scheduled (and run) before step t's output is read. ``tp_size=2`` runs one worker-side connector, with its own
paged cache, per tensor-parallel rank.

The fake forward writes, for each scheduled token at position ``p`` of layer ``l`` on rank ``r``, the value
``(3 * sum over ranks of kv[p - 1] + token + l + s) mod 65521`` read from the paged caches themselves (the
sum stands for the all-reduce), so KV computed over a prefix that is not in place on any rank (not loaded
yet, or failed) differs from ``expected_kv``. ``s`` is the KV slice the rank holds: ``r``, or ``r //
replicas`` when ranks share KV (MLA's latent: every rank; KV heads replicated over ranks). With an EAGLE
speculative config the last layer stands for the drafter's: ``token`` is then the token at ``p + 1`` (the
next prompt token, or the sampled one, always 7). MLA caches (``mla=True``) are ``(blocks, tokens, dim)``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    MLAAttentionSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from kvtier_connectors.vllm import KvtierConnector
from kvtier_connectors.vllm.settings import drafts_over_next_token, kv_head_replicas

BLOCK = 16
LAYERS = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")
HEADS, HEAD_DIM = 2, 16
EOS = 999
MODULUS = 65521


def write_model_dir(path: Path, num_kv_heads: int = HEADS, architecture: str = "LlamaForCausalLM") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": num_kv_heads,
        "num_hidden_layers": len(LAYERS), "head_dim": HEAD_DIM, "vocab_size": 1000,
        "max_position_embeddings": 4096, "torch_dtype": "float32", "rms_norm_eps": 1e-5,
    }))
    return path


def make_vllm_config(model_config: ModelConfig, extra: dict[str, Any], *, policy: str = "recompute",
                     max_batched_tokens: int = 512, num_blocks: int = 64, async_scheduling: bool = False,
                     tp_size: int = 1, kv_events: bool = False, eagle_draft: Path | None = None) -> VllmConfig:
    speculative = None if eagle_draft is None else SpeculativeConfig(
        method="eagle", model=str(write_model_dir(eagle_draft, architecture="EagleLlamaForCausalLM")),
        num_speculative_tokens=2, target_model_config=model_config, target_parallel_config=ParallelConfig())
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=max_batched_tokens,
                                         max_model_len=1024, is_encoder_decoder=False,
                                         enable_chunked_prefill=True, async_scheduling=async_scheduling),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_connectors.vllm",
            kv_role="kv_both", kv_connector_extra_config=extra, kv_load_failure_policy=policy,
        ),
        device_config=DeviceConfig("cpu"),
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null") if kv_events else None,
        speculative_config=speculative,
    )
    config.parallel_config.distributed_executor_backend = "uni"
    config.parallel_config.tensor_parallel_size = tp_size
    # vLLM's CPU platform turns async scheduling off; the GPU default (on) is what this harness reproduces.
    config.scheduler_config.async_scheduling = async_scheduling
    config.cache_config.num_gpu_blocks = num_blocks
    return config


def make_kv_cache_config(num_blocks: int = 64, num_kv_heads: int = HEADS, mla: bool = False) -> KVCacheConfig:
    spec: FullAttentionSpec = (
        MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=torch.float32) if mla else
        FullAttentionSpec(block_size=BLOCK, num_kv_heads=num_kv_heads, head_size=HEAD_DIM, dtype=torch.float32))
    page = spec.page_size_bytes
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * len(LAYERS), layers=list(LAYERS),
                                        layer_stride=page, block_stride=page * len(LAYERS))],
        kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)],
        kv_cache_layout="BLNHC",
    )


def expected_kv(tokens: list[int], layer_index: int, rank: int = 0, tp_size: int = 1, kv_replicas: int = 1,
                next_token: bool = False) -> list[int]:
    """What a full recompute of ``tokens`` writes (``next_token``: a drafter's layer, over the next tokens)."""
    values, previous = [], [0] * tp_size
    inputs = [*tokens[1:], 7] if next_token else tokens
    for token in inputs:
        total = sum(previous)
        previous = [(3 * total + token + layer_index + r // kv_replicas) % MODULUS for r in range(tp_size)]
        values.append(previous[rank])
    return values


def token_cells(cache: torch.Tensor, block_id: int, slot: int) -> torch.Tensor:
    """Every value one token holds in a page (all heads): MLA's ``(blocks, tokens, dim)`` or ``BLNHC``'s."""
    return cache[block_id, slot] if cache.dim() == 3 else cache[block_id, :, slot, :]


class Engine:
    """vLLM's Scheduler, one worker-side connector per rank and a fake forward over CPU KV tensors."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, graph_mode: str = "piecewise") -> None:
        self.async_scheduling = bool(vllm_config.scheduler_config.async_scheduling)
        scheduler_cls = AsyncScheduler if self.async_scheduling else Scheduler
        self.scheduler = scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, log_stats=True,
                                       structured_output_manager=StructuredOutputManager(vllm_config),
                                       block_size=BLOCK)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        mla = isinstance(kv_cache_config.kv_cache_groups[0].kv_cache_spec, MLAAttentionSpec)
        self.kv_replicas = self.tp_size if mla else kv_head_replicas(
            vllm_config.model_config.get_total_num_kv_heads(), self.tp_size)
        # With an EAGLE drafter the last layer stands for the drafter's: its KV is over the next token.
        self.draft_layer = len(LAYERS) - 1 if drafts_over_next_token(vllm_config.speculative_config) else None
        layout = KVCacheLayout[kv_cache_config.kv_cache_layout]
        self.workers: list[KvtierConnector] = []
        self.rank_caches: list[dict[str, torch.Tensor]] = []
        for rank in range(self.tp_size):
            with mock.patch("vllm.distributed.parallel_state.get_tensor_model_parallel_rank", return_value=rank):
                worker = KvtierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
            caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
            worker.register_kv_caches(caches)
            self.workers.append(worker)
            self.rank_caches.append(caches)
        self.worker, self.kv_caches = self.workers[0], self.rank_caches[0]
        self.aggregator = KVOutputAggregator(self.tp_size)
        self.graph_mode = graph_mode
        self.load_errors: list[set[int]] = []
        self.finished_sending: set[str] = set()
        self.full_graph_steps = 0
        self.stats: list[dict[str, Any]] = []
        # Steps run whose output the scheduler has not read yet (one at most under async scheduling).
        self.in_flight: deque[tuple[Any, ModelRunnerOutput]] = deque()

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
        """Schedule and run one step; read the output of the oldest step in flight (that one, without async)."""
        output = self.scheduler.schedule()
        self.in_flight.append((output, self._execute(output)))
        if len(self.in_flight) >= (2 if self.async_scheduling else 1):
            self._read_oldest()
        return output

    def _read_oldest(self) -> None:
        old_output, runner_output = self.in_flight.popleft()
        self.scheduler.update_from_output(old_output, runner_output)

    def _execute(self, output: Any) -> ModelRunnerOutput:
        for worker in self.workers:
            worker.bind_connector_metadata(output.kv_connector_metadata)
            if output.has_sync_kv_loads:
                worker.start_load_kv(None)  # type: ignore[arg-type]
        full_graph = self._full_graph(output)
        self.full_graph_steps += full_graph
        if output.num_scheduled_tokens:
            for layer_index, name in enumerate(LAYERS):
                if not full_graph:
                    for worker in self.workers:
                        worker.wait_for_layer_load(name)
                self._forward_layer(output, layer_index, name)
                if not full_graph:
                    for worker, caches in zip(self.workers, self.rank_caches, strict=True):
                        worker.save_kv_layer(name, caches[name], None)
        req_ids = list(output.num_scheduled_tokens)
        # A partial prefill samples nothing (the model runner discards its token): only a step that reaches
        # the end of the prompt samples, always token 7.
        sampled = [[7] if self.scheduler.requests[r].num_computed_tokens >= self.scheduler.requests[r].num_prompt_tokens
                    else [] for r in req_ids]
        outputs: list[ModelRunnerOutput | None] = []
        all_errors: set[int] = set()
        for worker in self.workers:
            if not output.has_sync_kv_loads:
                worker.start_load_kv(None)  # type: ignore[arg-type]
            worker.wait_for_save()
            sending, recving = worker.get_finished(output.finished_req_ids)
            errors = worker.get_block_ids_with_load_errors()
            all_errors |= errors
            stats = worker.get_kv_connector_stats()
            if stats is not None:
                self.stats.append(stats.data)
            kv_output = KVConnectorOutput(finished_sending=sending, finished_recving=recving, invalid_block_ids=errors,
                                          kv_connector_stats=stats,
                                          kv_connector_worker_meta=worker.build_connector_worker_meta())
            worker.clear_connector_metadata()
            outputs.append(ModelRunnerOutput(
                req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                sampled_token_ids=[list(tokens) for tokens in sampled], kv_connector_output=kv_output,
            ))
        self.load_errors.append(all_errors)
        merged = self.aggregator.aggregate(outputs)
        assert merged is not None and merged.kv_connector_output is not None
        self.finished_sending |= merged.kv_connector_output.finished_sending or set()
        return merged

    def _forward_layer(self, output: Any, layer_index: int, name: str) -> None:
        caches = [rank_caches[name] for rank_caches in self.rank_caches]
        for req_id, count in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            # The scheduler has already counted this step's tokens as computed.
            start = request.num_computed_tokens - count
            tokens = request.all_token_ids
            for position in range(start, start + count):
                total = 0
                if position:
                    page, slot = block_ids[(position - 1) // BLOCK], (position - 1) % BLOCK
                    total = sum(int(token_cells(cache, page, slot).flatten()[0]) for cache in caches)
                # Under async scheduling a sampled token is not appended yet: every sampled token is 7.
                index = position + (layer_index == self.draft_layer)
                token = tokens[index] if index < len(tokens) else 7
                for rank, cache in enumerate(caches):
                    value = (3 * total + token + layer_index + rank // self.kv_replicas) % MODULUS
                    token_cells(cache, block_ids[position // BLOCK], position % BLOCK).fill_(float(value))

    def kv_of(self, req_id: str, num_tokens: int, layer_index: int, rank: int = 0) -> list[int]:
        """The KV values vLLM's blocks of ``req_id`` hold on ``rank`` for its first ``num_tokens`` tokens."""
        cache = self.rank_caches[rank][LAYERS[layer_index]]
        block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        return [int(token_cells(cache, block_ids[p // BLOCK], p % BLOCK).flatten()[0]) for p in range(num_tokens)]

    def expected_kv(self, tokens: list[int], layer_index: int, rank: int = 0) -> list[int]:
        """What a full recompute of ``tokens`` writes in this engine (its ranks, KV slices and drafter)."""
        return expected_kv(tokens, layer_index, rank, self.tp_size, self.kv_replicas,
                           next_token=layer_index == self.draft_layer)

    def run_until_done(self, *requests: Request, timeout_s: float = 10.0) -> None:
        """Step until vLLM let go of ``requests``, then as vLLM's engine does while the connector has work."""
        deadline = time.monotonic() + timeout_s
        while any(r.request_id in self.scheduler.requests for r in requests):
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still held after {timeout_s} s")
            self.step()
            time.sleep(0.002)
        self.drain(deadline)

    def drain(self, deadline: float) -> None:
        """Read the steps in flight, and step while the connector asks for it (``has_pending_push_work``)."""
        connector = self.scheduler.connector
        while self.in_flight or (connector is not None and connector.has_pending_push_work()):
            if time.monotonic() > deadline:
                raise AssertionError("the connector kept the engine stepping past the deadline")
            if self.in_flight and not self.scheduler.has_requests():
                self._read_oldest()
            else:
                self.step()

    def close(self) -> None:
        for worker in self.workers:
            worker.shutdown()
        self.scheduler.shutdown()
