"""The commit rule under vLLM's real Scheduler: no chunk computed over KV that failed to load is ever stored.

A step's saves are staged and committed only once the scheduler read that step's output, merged over every
rank, and found no failed block under them (connectors/kvtier_connectors/vllm/scheduler.py). Each test makes
one stored chunk fail between the scheduler's lookup and the load, runs to the end, then reads back every
chunk of the prompt the store holds, on every rank, and compares it with what a full recompute writes.
Cases (issue 18): asynchronous scheduling (1), tensor parallelism with a failure on one rank (2), two
requests sharing a prefix in one step (3), recomputed chunks after a failed asynchronous load (7).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm import SamplingParams  # noqa: E402
from vllm.config import ModelConfig  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm_harness import (  # noqa: E402
    BLOCK,
    HEADS,
    LAYERS,
    Engine,
    make_kv_cache_config,
    make_vllm_config,
    token_cells,
    write_model_dir,
)

from kvtier.config import HostConfig, StoreConfig, TransferConfig  # noqa: E402
from kvtier.errors import CapacityError, StaleHandleError  # noqa: E402
from kvtier.job import Job  # noqa: E402
from kvtier.store import Lease, Reservation, Store  # noqa: E402
from kvtier_connectors.vllm.settings import adopt_store, layout_from_kv_cache_config  # noqa: E402

_instances = itertools.count()
NUM_BLOCKS = 64
SPARE_BLOCK = NUM_BLOCKS - 1  # read-back target: the tests never use this many blocks


class FailingStore(Store):
    """A store whose chosen keys are deleted between the scheduler's lookup and the worker's load (after
    ``spare_acquires`` acquires that include one of them: ranks that share a key acquire it in turn), whose
    ``reserve`` refuses a call with a key of ``refused`` as a full arena does, and whose ``commit`` refuses
    one with a key of ``refused_commits`` as a store that restarted does."""

    failing: set[bytes]
    spare_acquires = 0
    refused: frozenset[bytes] = frozenset()
    refused_commits: frozenset[bytes] = frozenset()

    def acquire(self, keys: Any, timeout: float | None = None) -> Lease:
        keys = list(keys)
        cut = next((i for i, key in enumerate(keys) if key in self.failing), len(keys))
        if cut < len(keys) and self.spare_acquires:
            self.spare_acquires -= 1
        elif cut < len(keys):
            self.host.drop(keys[cut])
            self.failing.discard(keys[cut])
            return super().acquire(keys[:cut], timeout)
        return super().acquire(keys, timeout)

    def reserve(self, keys: Any) -> Reservation:
        if self.refused.intersection(keys):
            raise CapacityError("the test's arena is full")
        return super().reserve(keys)

    def commit(self, reservation: Reservation) -> None:
        if self.refused_commits.intersection(reservation.keys):
            super().abort(reservation)
            raise StaleHandleError("the test's store restarted")
        super().commit(reservation)

    def get(self, keys: Any, blocks: Any) -> Job:
        job = super().get(keys, blocks)
        job.fail(i for i, key in enumerate(keys) if key in self.failing)
        return job


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    path = write_model_dir(tmp_path_factory.mktemp("tiny-llama"))
    return ModelConfig(model=str(path), dtype="float32", seed=0, skip_tokenizer_init=True)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def make_engine(model_config: ModelConfig, engines: list[Engine], *, async_scheduling: bool = False,
                tp_size: int = 1, policy: str = "recompute", max_batched_tokens: int = 512,
                extra: dict[str, Any] | None = None, num_kv_heads: int = HEADS, mla: bool = False,
                eagle_draft: Path | None = None) -> tuple[Engine, FailingStore]:
    init_none_hash(sha256)
    kv_cache_config = make_kv_cache_config(NUM_BLOCKS, num_kv_heads, mla)
    layout, _ = layout_from_kv_cache_config(kv_cache_config, 0)
    store = FailingStore(layout, StoreConfig(host=HostConfig(capacity_bytes=8 << 20),
                                             transfer=TransferConfig(backend="cpu")))
    store.failing = set()
    instance = f"commit-rule-{next(_instances)}"
    adopt_store(instance, store)
    # Every rank shares the one adopted store, as every process shares a daemon (store='daemon' allows TP).
    extra = {"instance": instance, **({"store": "daemon"} if tp_size > 1 else {}), **(extra or {})}
    config = make_vllm_config(model_config, extra, policy=policy, max_batched_tokens=max_batched_tokens,
                              num_blocks=NUM_BLOCKS, async_scheduling=async_scheduling, tp_size=tp_size,
                              eagle_draft=eagle_draft)
    engine = Engine(config, kv_cache_config)
    engines.append(engine)
    return engine, store


def prompt(seed: int, num_tokens: int) -> list[int]:
    return [(seed * 37 + i * 11) % 900 + 1 for i in range(num_tokens)]


def block_hashes(tokens: list[int]) -> list[Any]:
    params = SamplingParams(max_tokens=1)
    request = Request(request_id="hashes", prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK, sha256))
    if not request.block_hashes:
        request.update_block_hashes()
    return list(request.block_hashes)


def chunk_key(engine: Engine, tokens: list[int], chunk: int, rank: int = 0) -> bytes:
    worker = engine.workers[rank].worker_side
    assert worker is not None
    return worker.keys.key(worker.keys.chunk_hash(block_hashes(tokens), chunk))


def store_prefix_then_forget(engine: Engine, tokens: list[int]) -> None:
    engine.run_until_done(engine.add("writer", tokens))
    assert engine.scheduler.reset_prefix_cache()


def stored_chunks(engine: Engine, store: Store, tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """The chunks of ``tokens`` rank 0 holds in the store, and every (rank, chunk) held that is wrong.

    Each chunk held is read back through the worker's own scatter into a spare block and compared, value by
    value on every layer, with what a full recompute of the prompt writes.
    """
    held: list[int] = []
    wrong: list[tuple[int, int]] = []
    for rank, worker in enumerate(engine.workers):
        side = worker.worker_side
        assert side is not None and side.paged is not None
        for chunk in range(len(tokens) // BLOCK):
            lease = store.acquire([chunk_key(engine, tokens, chunk, rank)])
            if not lease.slots:
                continue
            try:
                side.paged.scatter_from_slots([SPARE_BLOCK], store.slot_rows(), lease.slots, 1)
            finally:
                store.release(lease)
            if rank == 0:
                held.append(chunk)
            for layer_index, name in enumerate(LAYERS):
                cache = engine.rank_caches[rank][name]
                actual = [int(token_cells(cache, SPARE_BLOCK, p).flatten()[0]) for p in range(BLOCK)]
                expected = engine.expected_kv(tokens, layer_index, rank)[chunk * BLOCK : (chunk + 1) * BLOCK]
                if actual != expected:
                    wrong.append((rank, chunk))
                    break
    return held, wrong


def drain(engine: Engine) -> None:
    engine.drain(time.monotonic() + 20)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_async_scheduling_stores_nothing_computed_over_a_failed_load(model_config: ModelConfig,
                                                                      engines: list[Engine], policy: str) -> None:
    """Item 1: vLLM plans step t+1 before it reads step t's load errors; t+1's chunks over the gap are dropped."""
    engine, store = make_engine(model_config, engines, async_scheduling=True, policy=policy,
                                max_batched_tokens=4 * BLOCK)
    published: list[Any] = []
    engine.scheduler.kv_event_publisher.publish = published.append  # type: ignore[method-assign]
    tokens = prompt(1, 12 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 3 * BLOCK + 1])
    published.clear()
    store.failing.add(chunk_key(engine, tokens, 1))
    victim = engine.add("victim", tokens)
    engine.run_until_done(victim, timeout_s=30)
    assert any(engine.load_errors), "the load never failed: the test lost its case"
    store.failing.clear()
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong, f"chunks stored over a failed load: {wrong}"
    # Item 6: BlockStored events follow commits: one per chunk committed, none for a dropped save.
    stored = [event.block_hashes[0] for batch in published for event in batch.events
              if getattr(event, "medium", None) == "CPU"]
    assert len(stored) == len(set(stored))
    if policy == "recompute":
        # The recomputed chunks were saved again: the whole prompt is stored.
        assert victim.status != RequestStatus.FINISHED_ERROR
        assert held == list(range(12))
        hashes = block_hashes(tokens)
        assert {hashes[c] for c in range(3, 12)} <= set(stored) <= {hashes[c] for c in range(12)}
    else:
        assert victim.status == RequestStatus.FINISHED_ERROR


def test_a_failure_on_one_rank_drops_every_ranks_saves(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 2: rank 1 alone fails chunk 1; rank 0's KV after it depends on it (all-reduce), so no rank keeps it."""
    engine, store = make_engine(model_config, engines, tp_size=2)
    tokens = prompt(2, 7 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 3 * BLOCK + 1])
    assert stored_chunks(engine, store, tokens) == ([0, 1, 2], [])
    # Item 6: vLLM sums the ranks' stats; the chunks saved once per rank count once.
    assert sum(data.get("saved_chunks", 0) for data in engine.stats) == 3
    store.failing.add(chunk_key(engine, tokens, 1, rank=1))
    victim = engine.add("victim", tokens)
    engine.run_until_done(victim, timeout_s=30)
    assert any(engine.load_errors)
    store.failing.clear()
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong, f"chunks stored over a failed load: {wrong}"
    assert held == list(range(7))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_shared_prefix_in_one_step_drops_the_sharers_saves(model_config: ModelConfig, engines: list[Engine],
                                                              async_scheduling: bool) -> None:
    """Item 3: a second request takes the first one's synchronously loaded blocks as a local hit in the same
    step; the load fails, and the second request's chunks computed over it are not stored. Under async
    scheduling vLLM rolls the second request back over the failing step's tokens only, after it planned the
    next step: what it computed over the gap stays, and its chunks past the prefix are never stored."""
    engine, store = make_engine(model_config, engines, async_scheduling=async_scheduling)
    system = prompt(3, 3 * BLOCK)
    first_tokens = [*system, *prompt(4, 3 * BLOCK + 2)]
    second_tokens = [*system, *prompt(5, 3 * BLOCK + 2)]
    store_prefix_then_forget(engine, [*system, 1])
    store.failing.add(chunk_key(engine, system, 1))
    first = engine.add("first", first_tokens)
    second = engine.add("second", second_tokens)
    output = engine.step()
    assert engine.load_errors[-1], "the load never failed: the test lost its case"
    assert set(output.num_scheduled_tokens) == {"first", "second"}
    # The second request computed only its question: it took the prefix from the first's loaded blocks.
    assert output.num_scheduled_tokens["second"] == len(second_tokens) - 3 * BLOCK
    engine.run_until_done(first, second, timeout_s=30)
    store.failing.clear()
    for tokens, whole in ((first_tokens, 6), (second_tokens, 3 if async_scheduling else 6)):
        held, wrong = stored_chunks(engine, store, tokens)
        assert not wrong, f"chunks stored over a failed load: {wrong}"
        assert held == list(range(whole))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_request_admitted_while_a_failed_load_is_in_flight_saves_nothing_it_computed_over_it(
        model_config: ModelConfig, engines: list[Engine], tp_size: int) -> None:
    """Asynchronous scheduling: a request admitted in step t+1 takes the blocks step t loads as a local hit and
    computes over them before step t's load errors are read. vLLM recomputes the loader's tokens from the
    failed block but keeps the newcomer's (only step t's tokens of a sharer are rolled back): the newcomer's
    chunks computed over the gap must never be stored, though its save cursor is rewound with the others."""
    engine, store = make_engine(model_config, engines, async_scheduling=True, max_batched_tokens=8 * BLOCK,
                                tp_size=tp_size)
    system = prompt(3, 4 * BLOCK)
    first_tokens = [*system, *prompt(4, 2 * BLOCK + 2)]
    later_tokens = [*system, *prompt(5, 3 * BLOCK + 2)]
    store_prefix_then_forget(engine, [*system, 1])
    store.failing.add(chunk_key(engine, system, 1, rank=tp_size - 1))  # on the last rank only
    first = engine.add("first", first_tokens)
    engine.step()
    later = engine.add("later", later_tokens)
    output = engine.step()
    assert output.num_scheduled_tokens["later"] == len(later_tokens) - len(system), "no hit on the loaded blocks"
    assert engine.load_errors[-2], "the load never failed: the test lost its case"
    engine.run_until_done(first, later, timeout_s=30)
    store.failing.clear()
    # vLLM's prefix cache keeps the newcomer's blocks computed over the gap: a repeat of its prompt takes them
    # as a local hit (the loader has refilled the failed block by then), and must not store them either.
    again = engine.add("again", later_tokens)
    output = engine.step()
    assert output.num_scheduled_tokens["again"] < BLOCK, "the repeat did not take the newcomer's blocks as a hit"
    engine.run_until_done(again, timeout_s=30)
    for tokens in (first_tokens, later_tokens):
        _, wrong = stored_chunks(engine, store, tokens)
        assert not wrong, f"chunks stored over a failed load: {wrong}"
    # The loader recomputed from the failed block on: all its chunks are stored again.
    assert stored_chunks(engine, store, first_tokens)[0] == list(range(6))


def test_blocks_a_failed_load_left_unfilled_are_never_saved_by_a_later_request(model_config: ModelConfig,
                                                                               engines: list[Engine]) -> None:
    """Under the recompute policy vLLM keeps a failed synchronous load's blocks in its prefix cache for their
    owner to recompute; aborted before it did, the owner leaves them there, and a request admitted later takes
    them, and the chunks computed over them, as a local hit. That request's saves must not store them."""
    engine, store = make_engine(model_config, engines, max_batched_tokens=4 * BLOCK)
    tokens = prompt(11, 6 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 4 * BLOCK + 1])
    store.failing.add(chunk_key(engine, tokens, 1))
    engine.add("owner", tokens, max_tokens=4)
    engine.step()
    assert engine.load_errors[-1], "the load never failed: the test lost its case"
    engine.scheduler.finish_requests("owner", RequestStatus.FINISHED_ABORTED)
    later = engine.add("later", tokens)
    output = engine.step()
    assert output.num_scheduled_tokens["later"] < BLOCK, "the later request did not take the blocks as a hit"
    engine.run_until_done(later, timeout_s=30)
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong, f"chunks stored over blocks a failed load left unfilled: {wrong}"
    assert held == [0, 2, 3]  # the writer's, less the one deleted: nothing computed over the unfilled blocks


def test_chunks_recomputed_after_a_failed_async_load_are_saved(model_config: ModelConfig,
                                                               engines: list[Engine]) -> None:
    """Item 7: an asynchronous load fails chunk 1; vLLM recomputes it, and the recomputed chunks are stored."""
    engine, store = make_engine(model_config, engines, extra={"sync_load_bytes": 0})
    tokens = prompt(6, 5 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 4 * BLOCK + 1])
    store.failing.add(chunk_key(engine, tokens, 1))
    victim = engine.add("victim", tokens)
    engine.run_until_done(victim, timeout_s=30)
    assert any(engine.load_errors)
    store.failing.clear()
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong
    assert held == list(range(5))


def test_saves_wait_for_their_verdict(model_config: ModelConfig, engines: list[Engine], tmp_path: Path) -> None:
    """The rule itself: a step's chunks are staged, not readable, until a later step's plan confirms the step;
    an idle engine keeps stepping (``has_pending_push_work``) until they are committed."""
    engine, store = make_engine(model_config, engines)
    tokens = prompt(7, 3 * BLOCK + 1)
    request = engine.add("one", tokens, max_tokens=1)
    engine.step()
    assert request.is_finished()
    side = engine.worker.worker_side
    assert side is not None and side.staged_chunks() == 3
    assert store.lookup([chunk_key(engine, tokens, c) for c in range(3)], prefetch=False).num_blocks == 0
    connector = engine.scheduler.connector
    assert connector is not None and connector.has_pending_push_work()
    drain(engine)
    assert side.staged_chunks() == 0
    assert not connector.has_pending_push_work()
    assert stored_chunks(engine, store, tokens) == ([0, 1, 2], [])


def test_saves_of_steps_whose_output_names_no_step_are_dropped(model_config: ModelConfig,
                                                               engines: list[Engine]) -> None:
    """Without the step number in the output (a worker that sent no ``KvtierWorkerMeta``) nothing is
    confirmed: the saves are dropped, a few steps later, and the engine stops stepping for them."""
    engine, store = make_engine(model_config, engines)
    engine.worker.build_connector_worker_meta = lambda: None  # type: ignore[method-assign]
    tokens = prompt(8, 3 * BLOCK + 1)
    engine.run_until_done(engine.add("one", tokens, max_tokens=1), timeout_s=30)
    connector = engine.scheduler.connector
    assert connector is not None and not connector.has_pending_push_work()
    side = engine.worker.worker_side
    assert side is not None and side.staged_chunks() == 0
    assert stored_chunks(engine, store, tokens) == ([], [])


@pytest.mark.parametrize("refusal", ["reserve", "commit"])
def test_a_chunk_one_rank_could_not_store_is_never_announced(model_config: ModelConfig, engines: list[Engine],
                                                             refusal: str) -> None:
    """Item 6: ``BlockStored`` follows the commits of every rank. Rank 1's save of the step holding chunk 2 is
    refused (a full arena, or a commit into a store that restarted): rank 0 commits chunks 2-3, but with rank
    1 missing them no hit can come from them, so they are not announced; the other chunks are, once each."""
    engine, store = make_engine(model_config, engines, tp_size=2, max_batched_tokens=2 * BLOCK)
    published: list[Any] = []
    engine.scheduler.kv_event_publisher.publish = published.append  # type: ignore[method-assign]
    tokens = prompt(9, 6 * BLOCK + 1)
    refused = frozenset({chunk_key(engine, tokens, 2, rank=1)})
    if refusal == "reserve":
        store.refused = refused
    else:
        store.refused_commits = refused
    engine.run_until_done(engine.add("one", tokens), timeout_s=30)
    held, wrong = stored_chunks(engine, store, tokens)
    assert not wrong and held == list(range(6))  # rank 0 holds all, rank 1 not chunks 2-3
    assert store.lookup([chunk_key(engine, tokens, c, rank=1) for c in range(6)], prefetch=False).num_blocks == 2
    stored = [event.block_hashes[0] for batch in published for event in batch.events
              if getattr(event, "medium", None) == "CPU"]
    hashes = block_hashes(tokens)
    assert sorted(stored) == sorted(hashes[c] for c in (0, 1, 4, 5))
    connector = engine.scheduler.connector
    assert connector is not None and not connector.has_pending_push_work()
