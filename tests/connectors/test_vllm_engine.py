"""The vLLM connector under vLLM's real Scheduler, driven in the model runner's call order (tests/connectors/
vllm_harness.py), with a forward whose KV depends on the KV before it: a cache may miss, never be wrong.

Each test names the issue item it holds: full-graph steps read loaded KV (1), a failed load stores nothing
computed over it (2), finished requests are never held (3), ``reset_connector`` (4), hybrid models (5),
a daemon killed and restarted mid-run (6), the synchronous load budget and ``requires_kv_delivery`` (7),
events and stats (8); plus chunked prefill, preemption and aborts under block pressure.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.config import ModelConfig  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import init_none_hash  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402
from vllm_harness import (  # noqa: E402
    BLOCK,
    LAYERS,
    Engine,
    expected_kv,
    make_kv_cache_config,
    make_vllm_config,
    write_model_dir,
)

from kvtier.config import HostConfig, StoreConfig, TransferConfig, config_from_mapping  # noqa: E402
from kvtier.daemon import Client  # noqa: E402
from kvtier.errors import KvtierError  # noqa: E402
from kvtier.job import Job  # noqa: E402
from kvtier.store import Lease, Store  # noqa: E402
from kvtier_connectors.vllm.settings import adopt_store, layout_from_kv_cache_config  # noqa: E402

_instances = itertools.count()


class FailingStore(Store):
    """A store whose chosen keys fail their read, as a block that fails its checksum does."""

    failing: set[bytes]

    def acquire(self, keys: Any, timeout: float | None = None) -> Lease:
        keys = list(keys)
        cut = next((i for i, key in enumerate(keys) if key in self.failing), len(keys))
        return super().acquire(keys[:cut], timeout)

    def get(self, keys: Any, blocks: Any) -> Job:
        job = super().get(keys, blocks)
        job.fail(i for i, key in enumerate(keys) if key in self.failing)
        return job


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    path = write_model_dir(tmp_path_factory.mktemp("tiny-llama"))
    return ModelConfig(model=str(path), dtype="float32", seed=0, skip_tokenizer_init=True)


def make_engine(model_config: ModelConfig, graph_mode: str = "piecewise", *, policy: str = "recompute",
                max_batched_tokens: int = 512, num_blocks: int = 64, extra: dict[str, Any] | None = None,
                store: Store | None = None, kv_events: bool = False) -> Engine:
    init_none_hash(sha256)
    kv_cache_config = make_kv_cache_config(num_blocks)
    layout, _ = layout_from_kv_cache_config(kv_cache_config, 0)
    extra = dict(extra or {})
    if extra.get("store") != "daemon":
        instance = f"engine-test-{next(_instances)}"
        if store is None:
            store = FailingStore(layout, StoreConfig(host=HostConfig(capacity_bytes=4 << 20),
                                                     transfer=TransferConfig(backend="cpu")))
            store.failing = set()
        adopt_store(instance, store)
        extra["instance"] = instance
    config = make_vllm_config(model_config, extra, policy=policy, max_batched_tokens=max_batched_tokens,
                              num_blocks=num_blocks, kv_events=kv_events)
    return Engine(config, kv_cache_config, graph_mode)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


def prompt(seed: int, num_tokens: int) -> list[int]:
    return [(seed * 37 + i * 11) % 900 + 1 for i in range(num_tokens)]


def assert_restored(engine: Engine, req_id: str, tokens: list[int], num_tokens: int) -> None:
    for layer_index in range(2):
        assert engine.kv_of(req_id, num_tokens, layer_index) == expected_kv(tokens, layer_index)[:num_tokens]


def store_prefix_then_forget(engine: Engine, tokens: list[int]) -> None:
    engine.run_until_done(engine.add("writer", tokens))
    assert engine.scheduler.reset_prefix_cache()


@pytest.mark.parametrize("graph_mode", ["piecewise", "full_and_piecewise", "full"])
def test_a_sync_hit_is_in_place_before_any_forward_reads_it(model_config: ModelConfig, engines: list[Engine],
                                                             graph_mode: str) -> None:
    """Item 1: a hit leaving one token makes a uniform-decode batch, which replays a full graph."""
    engine = make_engine(model_config, graph_mode)
    engines.append(engine)
    tokens = prompt(1, 5 * BLOCK + 1)
    store_prefix_then_forget(engine, tokens)
    reader = engine.add("reader", tokens)
    before = engine.full_graph_steps
    output = engine.step()
    assert output.num_scheduled_tokens["reader"] == 1
    assert reader.num_computed_tokens == len(tokens)
    if graph_mode != "piecewise":
        assert engine.full_graph_steps == before + 1
    # The one token computed read the loaded prefix: its KV is what a full recompute gives.
    assert_restored(engine, "reader", tokens, len(tokens))
    engine.run_until_done(reader)


@pytest.mark.parametrize("graph_mode", ["piecewise", "full"])
def test_a_failed_load_stores_nothing_computed_over_it(model_config: ModelConfig, engines: list[Engine],
                                                        graph_mode: str) -> None:
    """Item 2: chunk 1 fails; the chunks computed over it in that step are not saved, and later ones are right."""
    engine = make_engine(model_config, graph_mode)
    engines.append(engine)
    tokens = prompt(2, 6 * BLOCK + 3)
    store_prefix_then_forget(engine, tokens[: 2 * BLOCK + 1])
    store = engine.worker.store
    assert isinstance(store, FailingStore)
    keys = engine.worker.worker_side.keys if engine.worker.worker_side else None
    assert keys is not None
    writer_hashes = engine.add("hasher", tokens).block_hashes
    engine.scheduler.finish_requests("hasher", RequestStatus.FINISHED_ABORTED)
    engine.step()
    failing_key = keys.key(keys.chunk_hash(writer_hashes, 1))
    store.failing.add(failing_key)
    victim = engine.add("victim", tokens)
    engine.step()
    assert any(engine.load_errors[-1])
    engine.run_until_done(victim)
    store.failing.clear()
    # Everything stored now is right: a new request loads all of it and finds the recomputed KV.
    assert engine.scheduler.reset_prefix_cache()
    check = engine.add("check", tokens)
    engine.step()
    assert check.num_computed_tokens == len(tokens)
    assert_restored(engine, "check", tokens, 6 * BLOCK)
    engine.run_until_done(check)


def test_the_fail_policy_fails_the_request_and_stores_nothing_wrong(model_config: ModelConfig,
                                                                     engines: list[Engine]) -> None:
    engine = make_engine(model_config, policy="fail")
    engines.append(engine)
    tokens = prompt(3, 4 * BLOCK + 2)
    store_prefix_then_forget(engine, tokens[: 2 * BLOCK + 1])
    store = engine.worker.store
    assert isinstance(store, FailingStore)
    keys = engine.worker.worker_side.keys if engine.worker.worker_side else None
    assert keys is not None
    victim = engine.add("victim", tokens)
    store.failing.add(keys.key(keys.chunk_hash(victim.block_hashes, 1)))
    engine.run_until_done(victim)
    assert victim.status == RequestStatus.FINISHED_ERROR
    store.failing.clear()
    assert engine.scheduler.reset_prefix_cache()
    check = engine.add("check", tokens)
    engine.step()
    assert_restored(engine, "check", tokens, check.num_computed_tokens - (len(tokens) - 4 * BLOCK))
    engine.run_until_done(check)


def test_a_finished_request_is_never_held(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 3: saves are queued on the forward's stream, so vLLM frees a finished request's blocks at once."""
    engine = make_engine(model_config)
    engines.append(engine)
    request = engine.add("one", prompt(4, 5 * BLOCK + 1), max_tokens=1)
    engine.step()
    assert request.is_finished()
    assert "one" not in engine.scheduler.requests
    # Committed by the verdict of the next (empty) step, which the connector keeps vLLM stepping for.
    engine.drain(time.monotonic() + 10)
    assert engine.worker.store.stats().put_blocks == 5


def test_reset_connector_forgets_what_was_stored(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 4: after ``reset_prefix_cache(reset_connector=True)`` nothing stored before is loaded."""
    engine = make_engine(model_config)
    engines.append(engine)
    tokens = prompt(5, 4 * BLOCK + 1)
    engine.run_until_done(engine.add("before", tokens))
    assert engine.scheduler.reset_prefix_cache(reset_connector=True)
    after = engine.add("after", tokens)
    output = engine.step()
    assert output.num_scheduled_tokens["after"] == len(tokens)
    engine.run_until_done(after)
    # Saved again under the new epoch: found by the next request.
    assert engine.scheduler.reset_prefix_cache()
    again = engine.add("again", tokens)
    engine.step()
    assert again.num_computed_tokens == len(tokens)
    assert_restored(engine, "again", tokens, 4 * BLOCK)


def test_a_reset_is_shared_by_every_engine_of_the_model_and_survives_a_restart(
        model_config: ModelConfig, engines: list[Engine]) -> None:
    """Issue 18 item 5: one engine's reset puts the old KV out of reach for every engine on the store (they
    keep sharing afterwards), and an engine started after the reset does not go back to the old KV."""
    layout, _ = layout_from_kv_cache_config(make_kv_cache_config(64), 0)
    shared = FailingStore(layout, StoreConfig(host=HostConfig(capacity_bytes=4 << 20),
                                              transfer=TransferConfig(backend="cpu")))
    shared.failing = set()
    first, second = make_engine(model_config, store=shared), make_engine(model_config, store=shared)
    engines += [first, second]
    tokens = prompt(8, 4 * BLOCK + 1)
    first.run_until_done(first.add("before", tokens))
    assert first.scheduler.reset_prefix_cache(reset_connector=True)
    # The other engine sees the reset at its next lookup: the old KV is not loaded.
    late = second.add("late", tokens)
    assert second.step().num_scheduled_tokens["late"] == len(tokens)
    second.run_until_done(late)
    # ... and what it saved under the new epoch is found by the engine that reset.
    again = first.add("again", tokens)
    first.step()
    assert again.num_computed_tokens == len(tokens)
    assert_restored(first, "again", tokens, 4 * BLOCK)
    # A restarted engine (a new connector on the same store) starts in the store's epoch.
    third = make_engine(model_config, store=shared)
    engines.append(third)
    fresh = third.add("fresh", tokens)
    third.step()
    assert fresh.num_computed_tokens == len(tokens)
    assert_restored(third, "fresh", tokens, 4 * BLOCK)


def test_a_reset_the_store_cannot_record_fails_and_still_forgets(
        model_config: ModelConfig, engines: list[Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset the store refuses (a daemon gone) is reported failed, and this engine still finds nothing
    saved before it."""
    engine = make_engine(model_config)
    engines.append(engine)
    tokens = prompt(9, 4 * BLOCK + 1)
    engine.run_until_done(engine.add("before", tokens))
    store = engine.worker.store  # the embedded store the scheduler side shares

    def refuse(scope: str) -> int:
        raise KvtierError("the daemon is gone")

    monkeypatch.setattr(store, "advance_epoch", refuse)
    assert not engine.scheduler.reset_prefix_cache(reset_connector=True)
    after = engine.add("after", tokens)
    assert engine.step().num_scheduled_tokens["after"] == len(tokens)
    engine.run_until_done(after)


def test_chunked_prefill_preemption_and_aborts_under_block_pressure(model_config: ModelConfig,
                                                                    engines: list[Engine]) -> None:
    engine = make_engine(model_config, "full_and_piecewise", max_batched_tokens=48, num_blocks=16)
    engines.append(engine)
    preemptions: list[str] = []
    preempt = engine.scheduler._preempt_request

    def counted(request: Any, *args: Any, **kwargs: Any) -> Any:
        preemptions.append(request.request_id)
        return preempt(request, *args, **kwargs)

    engine.scheduler._preempt_request = counted  # type: ignore[method-assign]
    prompts = {f"r{i}": prompt(10 + i, 4 * BLOCK + 5) for i in range(4)}
    requests = [engine.add(req_id, tokens, max_tokens=40) for req_id, tokens in prompts.items()]
    for _ in range(3):
        engine.step()
    engine.scheduler.finish_requests("r3", RequestStatus.FINISHED_ABORTED)
    engine.run_until_done(*requests, timeout_s=30)
    assert preemptions, "no preemption: the test lost its block pressure"
    assert engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 15
    # Everything stored is right: each prompt's stored prefix loads as a full recompute would write it.
    for req_id in ("r0", "r1", "r2"):
        assert engine.scheduler.reset_prefix_cache()
        tokens = prompts[req_id]
        check = engine.add(f"check-{req_id}", tokens)
        engine.step()
        assert check.num_computed_tokens == len(tokens)
        assert_restored(engine, f"check-{req_id}", tokens, 4 * BLOCK)
        engine.run_until_done(check)


def test_loads_past_the_sync_budget_run_asynchronously(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 7: with ``sync_load_bytes`` 0 a host hit loads in the background; no request needs KV delivery."""
    engine = make_engine(model_config, extra={"sync_load_bytes": 0})
    engines.append(engine)
    assert engine.worker.requires_kv_delivery is False
    tokens = prompt(6, 3 * BLOCK + 2)
    store_prefix_then_forget(engine, tokens)
    reader = engine.add("reader", tokens)
    engine.step()
    assert reader.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    deadline = time.monotonic() + 10
    while "reader" not in engine.step().num_scheduled_tokens:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert_restored(engine, "reader", tokens, 3 * BLOCK)
    engine.run_until_done(reader)


def test_events_and_stats(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Item 8: a BlockStored event per saved chunk, and chunk counters through vLLM's stats."""
    engine = make_engine(model_config)
    engines.append(engine)
    published: list[Any] = []
    engine.scheduler.kv_event_publisher.publish = published.append  # type: ignore[method-assign]
    tokens = prompt(7, 3 * BLOCK + 1)
    request = engine.add("one", tokens)
    engine.run_until_done(request)
    connector = engine.scheduler.connector
    assert connector is not None
    events = [event for batch in published for event in batch.events if getattr(event, "medium", None) == "CPU"]
    assert [event.block_hashes for event in events] == [[h] for h in request.block_hashes[:3]]
    assert events[1].token_ids == tokens[BLOCK : 2 * BLOCK]
    assert all(event.medium == "CPU" for event in events)
    assert sum(data.get("saved_chunks", 0) for data in engine.stats) == 3
    merged = type(connector).build_kv_connector_stats(engine.stats[0])
    assert merged is not None and merged.reduce()["saved_chunks"] >= 1


# -- a daemon killed and restarted under the scheduler ---------------------------------------------------


def start_daemon(socket_path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "serve", "--socket", socket_path, "--pool",
                             "4MiB", "--no-disk", "--metrics-port", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    layout, _ = layout_from_kv_cache_config(make_kv_cache_config(), 0)
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(layout, config_from_mapping({"daemon": {"connect": f"unix:{socket_path}"}})).close()
            return proc
        except (KvtierError, OSError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)


@pytest.fixture
def socket_path() -> Iterator[str]:
    workdir = tempfile.mkdtemp(prefix="kvv", dir="/tmp")  # a Unix socket path has at most 107 bytes
    yield os.path.join(workdir, "d.sock")
    Path(workdir, "d.sock").unlink(missing_ok=True)
    os.rmdir(workdir)


def test_a_daemon_killed_and_restarted_mid_run(model_config: ModelConfig, engines: list[Engine],
                                               socket_path: str) -> None:
    """Item 6: a daemon that goes away is a miss inside ``schedule()``; the client reconnects to its successor."""
    daemon = start_daemon(socket_path)
    try:
        engine = make_engine(model_config, extra={"store": "daemon", "instance": f"daemon-{next(_instances)}",
                                                  "config": {"daemon": {"connect": f"unix:{socket_path}"}}})
        engines.append(engine)
        tokens = prompt(8, 3 * BLOCK + 1)
        store_prefix_then_forget(engine, tokens)
        daemon.kill()
        daemon.wait()
        # Gone: misses, never an exception from schedule() or the worker.
        lost = engine.add("lost", tokens)
        output = engine.step()
        assert output.num_scheduled_tokens["lost"] == len(tokens)
        engine.run_until_done(lost)
        daemon = start_daemon(socket_path)
        assert engine.scheduler.reset_prefix_cache()
        deadline = time.monotonic() + 20
        attempt = 0
        while True:
            attempt += 1
            request = engine.add(f"back-{attempt}", tokens)
            engine.run_until_done(request)
            assert engine.scheduler.reset_prefix_cache()
            check = engine.add(f"check-{attempt}", tokens)
            engine.step()
            if check.num_computed_tokens == len(tokens):
                assert_restored(engine, check.request_id, tokens, 3 * BLOCK)
                engine.run_until_done(check)
                break
            engine.run_until_done(check)
            assert engine.scheduler.reset_prefix_cache()
            assert time.monotonic() < deadline, "the client never reconnected"
            time.sleep(0.2)
    finally:
        daemon.terminate()
        daemon.wait(30)


def wait_stopped(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until every thread of ``pid`` is stopped (a SIGSTOP takes effect as each thread next runs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for tid in os.listdir(f"/proc/{pid}/task")]
        if all(state == "T" for state in states):
            return
        assert time.monotonic() < deadline, f"daemon threads not stopped: {states}"
        time.sleep(0.05)


def test_a_stalled_daemon_is_a_miss_inside_schedule(model_config: ModelConfig, engines: list[Engine],
                                                     socket_path: str) -> None:
    """Issue 18 item 4: with the daemon paused (SIGSTOP), ``schedule()`` returns once the scheduler's own
    connection passes its deadline (``scheduler_timeout_s``), counting a miss; the engine carries on after."""
    daemon = start_daemon(socket_path)
    try:
        engine = make_engine(model_config, extra={"store": "daemon", "instance": f"daemon-{next(_instances)}",
                                                  "scheduler_timeout_s": 0.5,
                                                  "config": {"daemon": {"connect": f"unix:{socket_path}"}}})
        engines.append(engine)
        tokens = prompt(9, 3 * BLOCK + 1)
        store_prefix_then_forget(engine, tokens)
        stalled = engine.add("stalled", tokens)
        outputs: list[Any] = []
        daemon.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(daemon.pid)
            thread = threading.Thread(target=lambda: outputs.append(engine.scheduler.schedule()), daemon=True)
            thread.start()
            thread.join(30)
            waited = thread.is_alive()
        finally:
            daemon.send_signal(signal.SIGCONT)
        thread.join(60)
        assert not waited, "schedule() waited on the paused daemon"
        assert outputs[0].num_scheduled_tokens["stalled"] == len(tokens)
        engine.in_flight.append((outputs[0], engine._execute(outputs[0])))
        engine.drain(time.monotonic() + 30)
        engine.run_until_done(stalled, timeout_s=30)
    finally:
        daemon.terminate()
        daemon.wait(30)


def test_a_prompt_of_whole_chunks_loads_its_last_chunk(model_config: ModelConfig, engines: list[Engine]) -> None:
    """Issue 18 item 9: the last chunk of a prompt that ends on a chunk boundary loads too; vLLM computes only
    the prompt's last token, over it."""
    engine = make_engine(model_config)
    engines.append(engine)
    tokens = prompt(11, 4 * BLOCK)
    store_prefix_then_forget(engine, tokens)
    reader = engine.add("reader", tokens)
    output = engine.step()
    assert output.num_scheduled_tokens["reader"] == 1
    assert reader.num_computed_tokens == len(tokens)
    assert_restored(engine, "reader", tokens, len(tokens))
    engine.run_until_done(reader)


def test_a_daemon_restarted_in_the_middle_of_a_save(model_config: ModelConfig, engines: list[Engine],
                                                    socket_path: str) -> None:
    """The daemon restarts between two layers' gathers of a step's save, another client fills the successor's
    slots, and the worker's client reconnects to it: the rest of that save is dropped (its slots name the
    lost arena), nothing of it is written or committed in the successor, and the saves of the later steps are
    stored right there."""
    from test_vllm_commit_rule import stored_chunks

    daemon = start_daemon(socket_path)
    filler_keys = [bytes([index]) * 16 for index in range(8)]
    try:
        config = {"daemon": {"connect": f"unix:{socket_path}"}}
        engine = make_engine(model_config, max_batched_tokens=BLOCK,
                             extra={"store": "daemon", "instance": f"daemon-{next(_instances)}", "config": config})
        engines.append(engine)
        tokens = prompt(12, 5 * BLOCK + 1)
        request = engine.add("saver", tokens)
        engine.step()  # chunk 0
        worker = engine.workers[0]
        save_kv_layer = worker.save_kv_layer
        layout, _ = layout_from_kv_cache_config(make_kv_cache_config(), 0)

        def restart_after_the_first_layer(name: str, *args: Any, **kwargs: Any) -> None:
            nonlocal daemon
            save_kv_layer(name, *args, **kwargs)
            if name == LAYERS[0]:
                daemon.kill()
                daemon.wait()
                daemon = start_daemon(socket_path)
                with Client(layout, config_from_mapping(config)) as filler:
                    blocks = [torch.full((layout.block_numel,), 7.0) for _ in filler_keys]
                    assert filler.put(filler_keys, blocks).wait(30).ok
                store = worker.worker_side.store  # type: ignore[union-attr]
                with pytest.raises(KvtierError):
                    store.lookup(filler_keys)  # the connection to the first daemon is found broken
                assert store.lookup(filler_keys).num_blocks == len(filler_keys)  # reconnected

        worker.save_kv_layer = restart_after_the_first_layer  # type: ignore[method-assign]
        engine.step()  # chunk 1: its gathers straddle the restart
        worker.save_kv_layer = save_kv_layer  # type: ignore[method-assign]
        engine.run_until_done(request, timeout_s=30)
        with Client(layout, config_from_mapping(config)) as reader:
            held, wrong = stored_chunks(engine, reader, tokens)  # type: ignore[arg-type]
            out = [torch.empty(layout.block_numel) for _ in filler_keys]
            assert reader.get(filler_keys, out).wait(30).ok
        assert all(bool((block == 7.0).all()) for block in out), "the save wrote into the successor's slots"
        assert not wrong, f"chunks stored wrong across the restart: {wrong}"
        assert held == [2, 3, 4]  # 0 and 1 went with the first daemon; the later ones are in its successor
    finally:
        daemon.terminate()
        daemon.wait(30)
