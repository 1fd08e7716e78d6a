"""The vLLM worker's data path without vLLM: pages in place between a block-outermost paged cache and arena
slots, with copy submissions and store round trips that do not grow with the number of chunks, and no
pinned allocation per step. Also runs on CUDA (``gpu``) where one is present; ``bench_worker`` runs on both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvtier.config import HostConfig, StoreConfig, TransferConfig
from kvtier.layout import KVLayout
from kvtier.native import PagedKV
from kvtier.store import Store
from kvtier_connectors.vllm import bench_worker
from kvtier_connectors.vllm.settings import ChunkKeys, ConnectorSettings, VllmGeometry
from kvtier_connectors.vllm.specs import LoadSpec, SaveSpec, StepPlan, Verdict
from kvtier_connectors.vllm.worker import WorkerSide

LAYERS, HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4
NUM_BLOCKS = 160


class Rig:
    def __init__(self, device: torch.device, pages_per_chunk: int = 1) -> None:
        names = tuple(f"layers.{i}.attn" for i in range(LAYERS))
        self.layout = KVLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, dtype="float32",
                               block_tokens=BLOCK * pages_per_chunk)
        geometry = VllmGeometry(names, BLOCK, BLOCK, NUM_BLOCKS, "BLNHC")
        self.kv = torch.randn(NUM_BLOCKS, LAYERS, HEADS, BLOCK, 2 * HEAD_DIM, device=device)
        self.store = Store(self.layout, StoreConfig(host=HostConfig(capacity_bytes=256 * self.layout.block_bytes),
                                                    transfer=TransferConfig(backend="cpu")))
        self.keys = ChunkKeys(ConnectorSettings(model_id="m"), self.layout, geometry)
        self.worker = WorkerSide(self.layout, geometry, self.store, self.keys)
        self.worker.register_kv_caches({name: self.kv[:, i] for i, name in enumerate(names)})
        self.store.arena.wait_pinned()  # registered by register_kv_caches on the caches' device
        self.names = names

    def hashes(self, count: int, seed: int) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(f"{seed}:{c}".encode()).digest() for c in range(count))

    def save(self, plan: StepPlan, per_layer: bool) -> None:
        if per_layer:
            for name in self.names:
                self.worker.save_kv_layer(name, plan)
        self.worker.wait_for_save(plan)
        self.worker.settle([Verdict(plan.step)])
        if self.kv.device.type == "cuda":
            torch.cuda.synchronize()
        self.worker.poll()

    def close(self) -> None:
        self.worker.shutdown()
        self.store.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig(torch.device("cpu"))
    yield made
    made.close()


class Recorder:
    """Counts the paged cache's copy submissions (one kernel launch each on CUDA) and the store's round trips."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
        self.copies = 0
        self.store_calls = 0
        original_copy = PagedKV._copy

        def copy(paged: PagedKV, *args: Any) -> None:
            self.copies += 1
            original_copy(paged, *args)

        monkeypatch.setattr(PagedKV, "_copy", copy)
        for name in ("acquire", "release", "reserve", "commit", "abort", "slot_rows"):
            original = getattr(store, name)
            monkeypatch.setattr(store, name, self._counted(original))

        def no_pinning(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a pinned allocation in a step")

        original_empty = torch.empty

        def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.get("pin_memory"):
                no_pinning()
            return original_empty(*args, **kwargs)

        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)

    def _counted(self, method: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.store_calls += 1
            return method(*args, **kwargs)

        return counted

    def take(self) -> tuple[int, int]:
        counts, self.copies, self.store_calls = (self.copies, self.store_calls), 0, 0
        return counts


@pytest.mark.parametrize("per_layer", [False, True], ids=["full-graph", "piecewise"])
def test_submissions_do_not_grow_with_chunks(rig: Rig, monkeypatch: pytest.MonkeyPatch, per_layer: bool) -> None:
    recorder = Recorder(monkeypatch, rig.store)
    seen = []
    for seed, count in enumerate((2, 8, 32)):
        hashes = rig.hashes(count, seed)
        rig.save(StepPlan(saves=[SaveSpec("a", hashes, tuple(range(count)))]), per_layer)
        save_counts = recorder.take()
        target = tuple(range(64, 64 + count))
        rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, target, 0, False)]))
        rig.worker.poll()
        load_counts = recorder.take()
        assert torch.equal(rig.kv[list(target)], rig.kv[:count])
        seen.append((save_counts, load_counts))
    # Saves: one copy per layer handed over by the forward, else one for all layers; loads: one copy.
    assert seen[0][0][0] == (LAYERS if per_layer else 1)
    assert seen[0][1][0] == 1
    assert all(counts == seen[0] for counts in seen)


def test_a_partial_first_chunk_costs_copies_per_page_not_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(torch.device("cpu"), pages_per_chunk=2)
    try:
        for seed, count in enumerate((2, 16)):
            hashes = rig.hashes(count, seed)
            rig.save(StepPlan(saves=[SaveSpec("a", hashes, tuple(range(2 * count)))]), per_layer=False)
            recorder = Recorder(monkeypatch, rig.store)
            target = tuple(range(80, 80 + 2 * count - 1))
            rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, target, 1, False)]))
            assert recorder.take()[0] == 1
            assert torch.equal(rig.kv[list(target)], rig.kv[1 : 2 * count])
            monkeypatch.undo()
    finally:
        rig.close()


def test_saves_commit_and_leases_release_only_after_their_copies(rig: Rig) -> None:
    hashes = rig.hashes(3, 7)
    plan = StepPlan(saves=[SaveSpec("a", hashes, (5, 6, 7))])
    rig.save(plan, per_layer=True)
    assert rig.worker.pending_copies() == 0
    assert rig.store.lookup(rig.keys.keys(hashes), prefetch=False).num_blocks == 3
    # A lease is held exactly until the scatter ran: on the CPU the copy is done when start_load_kv returns.
    rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, (50, 51, 52), 0, False)]))
    assert rig.store.host.stats().pinned_blocks == 0
    assert torch.equal(rig.kv[[50, 51, 52]], rig.kv[[5, 6, 7]])


def test_a_verdict_commits_what_it_keeps_and_a_dropped_chunk_is_saved_again(rig: Rig) -> None:
    hashes = rig.hashes(3, 9)
    rig.save(StepPlan(saves=[SaveSpec("a", hashes[:1], (1,))]), per_layer=False)
    later, other = rig.hashes(2, 10), rig.hashes(1, 11)
    plan = StepPlan(loads=[LoadSpec("b", hashes, (20, 21, 22), 0, False)],
                    saves=[SaveSpec("b", later, (23, 24)), SaveSpec("c", other, (30,))], step=5)
    rig.worker.start_load_kv(plan)
    rig.worker.wait_for_save(plan)
    assert rig.worker.get_block_ids_with_load_errors() == {21, 22}
    # Nothing is readable before the verdict; the recomputed chunk, staged again by a later step, takes the
    # dropped copy's slot and is decided by that step's verdict.
    assert rig.store.lookup(rig.keys.keys(other), prefetch=False).num_blocks == 0
    again = StepPlan(saves=[SaveSpec("b", later[:1], (40,))], step=6)
    rig.worker.wait_for_save(again)
    rig.worker.start_load_kv(StepPlan(step=7, verdicts=[Verdict(5, frozenset(later))]))
    assert rig.store.lookup(rig.keys.keys(later), prefetch=False).num_blocks == 0
    assert rig.store.lookup(rig.keys.keys(other), prefetch=False).num_blocks == 1
    rig.worker.start_load_kv(StepPlan(step=8, verdicts=[Verdict(6)]))
    assert rig.store.lookup(rig.keys.keys(later), prefetch=False).num_blocks == 1
    rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("d", later[:1], (50,), 0, False)], step=9))
    assert torch.equal(rig.kv[50], rig.kv[40])


def test_bench_worker_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_worker.main(["--device", "cpu", "--chunks", "2,4", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [row["chunks"] for row in report["results"]] == [2, 4]
    assert all(row["saves_all_finished"] and row["load_identical"] for row in report["results"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pages_round_trip_through_slots_in_place() -> None:
    rig = Rig(torch.device("cuda"))
    try:
        hashes = rig.hashes(16, 12)
        rig.save(StepPlan(saves=[SaveSpec("a", hashes, tuple(range(16)))]), per_layer=True)
        assert rig.store.lookup(rig.keys.keys(hashes), prefetch=False).num_blocks == 16
        target = tuple(range(100, 116))
        rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, target, 0, False)]))
        torch.cuda.synchronize()
        rig.worker.poll()
        assert rig.worker.pending_copies() == 0
        assert torch.equal(rig.kv[list(target)], rig.kv[:16])
        assert rig.worker.paged is not None and rig.worker.paged.fallbacks == 0
    finally:
        rig.close()


class FakeEvent:
    """A CUDA event that completes when the test says so."""

    done = False

    def record(self, stream: object = None) -> None:
        # On the pages' device's stream, or on the worker's own load stream.
        assert str(stream).startswith("stream of cuda:") or isinstance(stream, FakeStream), "on a device stream"

    def query(self) -> bool:
        return FakeEvent.done


def test_commits_and_releases_wait_for_the_copies_events(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on CUDA: a save is committed, a lease released, only once the copy's event completed; a finished
    request is never waited for (there is nothing to report: saves hold no request)."""
    assert rig.worker.paged is not None
    monkeypatch.setattr(rig.worker.paged, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(FakeEvent, "done", False)
    hashes = rig.hashes(4, 13)
    rig.worker.wait_for_save(StepPlan(saves=[SaveSpec("a", hashes, (0, 1, 2, 3))]))
    rig.worker.settle([Verdict(0)])
    assert rig.worker.get_finished({"a"}) == (None, None)
    assert rig.worker.pending_copies() == 1
    assert rig.store.lookup(rig.keys.keys(hashes), prefetch=False).num_blocks == 0
    FakeEvent.done = True
    rig.worker.poll()
    assert rig.store.lookup(rig.keys.keys(hashes), prefetch=False).num_blocks == 4
    FakeEvent.done = False
    rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, (40, 41, 42, 43), 0, False)]))
    assert rig.store.host.stats().pinned_blocks == 4
    rig.worker.get_finished(set())
    assert rig.store.host.stats().pinned_blocks == 4
    FakeEvent.done = True
    rig.worker.get_finished(set())
    assert rig.store.host.stats().pinned_blocks == 0


def test_shutdown_waits_for_each_copy_by_its_event_and_never_releases_under_a_running_one(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown waits for the queued copies by their own events (a device-wide synchronize would wait on
    torch's current GPU only, not a cache on ``cuda:1``), in order, up to its deadline; a copy still running
    then keeps its slots (its lease stays pinned) and the worker says so."""
    assert rig.worker.paged is not None
    monkeypatch.setattr(rig.worker.paged, "device", torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("a device-wide sync"))
    monkeypatch.setattr(FakeEvent, "done", False)
    hashes = rig.hashes(4, 17)
    rig.worker.wait_for_save(StepPlan(saves=[SaveSpec("a", hashes, (0, 1, 2, 3))]))
    rig.worker.settle([Verdict(0)])
    rig.worker.start_load_kv(StepPlan(step=1))
    assert rig.worker.pending_copies() == 1
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        rig.worker.shutdown(timeout_s=0.05)
    assert 0.05 <= time.monotonic() - started < 5
    assert "still running on the GPU" in caplog.text
    # The save's copy never completed: not committed, and its slots still held (never reused under it).
    assert rig.store.lookup(rig.keys.keys(hashes), prefetch=False).num_blocks == 0
    assert rig.store.host.stats().writing_blocks == 4
    assert rig.worker.pending_copies() == 0
    FakeEvent.done = True


def test_micro_batches_on_two_threads_save_each_page_as_finally_written(rig: Rig) -> None:
    """Two threads hand the same layers over in one step (vLLM micro-batches): no layer is saved stale."""
    hashes = rig.hashes(8, 7)
    plan = StepPlan(saves=[SaveSpec("a", hashes[:4], tuple(range(4))), SaveSpec("b", hashes[4:], tuple(range(4, 8)))])
    final_b = torch.randn_like(rig.kv[4:8])
    rig.kv[4:8] = 0  # micro-batch 2 has not written its pages when micro-batch 1 hands the layers over

    handed, finish = threading.Event(), threading.Event()

    def micro_batch() -> None:  # both threads live through the step, as vLLM's micro-batch threads do
        for name in rig.names:
            rig.worker.save_kv_layer(name, plan)
        handed.set()
        finish.wait(60)

    first = threading.Thread(target=micro_batch)
    first.start()
    assert handed.wait(60)
    handed.clear()
    rig.kv[4:8] = final_b  # micro-batch 2's forward
    second = threading.Thread(target=micro_batch)
    second.start()
    assert handed.wait(60)
    finish.set()
    first.join(60)
    second.join(60)
    rig.worker.wait_for_save(plan)
    rig.worker.settle([Verdict(plan.step)])
    rig.worker.poll()
    target = tuple(range(64, 72))
    rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("c", hashes, target, 0, False)]))
    rig.worker.poll()
    assert rig.worker.get_block_ids_with_load_errors() == set()
    assert torch.equal(rig.kv[list(target)], rig.kv[:8])


class FakeStream:
    """A CUDA stream that records the streams it was ordered after."""

    def __init__(self, *args: object) -> None:
        self.waited: list[object] = []

    def wait_stream(self, other: object) -> None:
        self.waited.append(other)


def test_an_async_load_scatters_on_its_own_stream_and_is_reported_once_it_ran(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18 item 8: the scatter of a finished asynchronous load is queued on a load stream (ordered after
    the forward's stream), not on the forward's, and its request is reported received only once it ran."""
    assert rig.worker.paged is not None
    hashes = rig.hashes(2, 21)
    rig.save(StepPlan(saves=[SaveSpec("a", hashes, (0, 1))]), per_layer=False)
    monkeypatch.setattr(rig.worker.paged, "device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "done", False)
    streams: list[FakeStream] = []
    entered: list[object] = []

    def make_stream(*args: object) -> FakeStream:
        streams.append(FakeStream())
        return streams[-1]

    @contextlib.contextmanager
    def use_stream(stream: object) -> Iterator[None]:
        entered.append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", make_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: "stream of cuda:0")
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    rig.worker.start_load_kv(StepPlan(loads=[LoadSpec("b", hashes, (60, 61), 0, True)]))
    deadline = time.monotonic() + 30
    while not entered:
        assert rig.worker.get_finished(set()) == (None, None)
        assert time.monotonic() < deadline, "the asynchronous load never finished"
        time.sleep(0.01)
    assert [stream.waited for stream in streams] == [["stream of cuda:0"]]
    assert entered == streams
    assert torch.equal(rig.kv[[60, 61]], rig.kv[[0, 1]])
    assert rig.worker.get_finished(set()) == (None, None)
    FakeEvent.done = True
    assert rig.worker.get_finished(set()) == (None, {"b"})
