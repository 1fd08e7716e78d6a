"""The SGLang backend driven through SGLang's real storage factory and host pool classes on the CPU.

Pages go from one host pool into kvtier and back into another (every host layout, MHA and MLA), byte for
byte; missing, evicted and corrupt pages are reported missing; pools kvtier cannot serve are refused.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.sglang
if importlib.util.find_spec("sglang") is None:
    pytest.skip("needs SGLang installed (make test-sglang)", allow_module_level=True)

import sglang_pools as sp  # noqa: E402  (before anything else imports SGLang: see its docstring)

from kvtier.errors import ClosedError, ConfigError, InvalidInputError, LayoutMismatchError  # noqa: E402
from kvtier_connectors.sglang import KvtierStorage  # noqa: E402

EMBEDDED = {"config": {"host": {"capacity_bytes": "64KiB", "policy": "lru"}, "transfer": {"backend": "cpu"}}}
_next_prompt = iter(range(1, 1 << 30))


def fresh_hashes(num_pages: int) -> list[str]:
    """Page hashes of a prompt no other test used, so tests sharing a daemon never see each other's pages."""
    return sp.page_hashes(num_pages, first_token=next(_next_prompt) * 1000)


def assert_same_pages(writer: Any, written: torch.Tensor, reader: Any, read: torch.Tensor) -> None:
    for src, dst in zip(written.tolist(), read.tolist(), strict=True):
        assert torch.equal(sp.token_kv(reader, dst), sp.token_kv(writer, src))


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, sp.Daemon]]:
    started = {kind: sp.Daemon(sp.LAYOUT_ARGS[kind], "--no-disk") for kind in sp.KINDS}
    yield started
    for daemon in started.values():
        daemon.stop()


@pytest.fixture
def backends() -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []

    def open_backend(pool: Any, **settings: Any) -> Any:
        backend = sp.open_backend(pool, **settings)
        opened.append(backend)
        return backend

    yield open_backend
    for backend in opened:
        backend.close()


def on_daemon(daemon: sp.Daemon) -> dict[str, Any]:
    return {"store": "daemon", "address": daemon.address}


# -- loading and registration ------------------------------------------------------------------------------


def test_sglangs_dynamic_factory_builds_the_backend(backends: Callable[..., Any]) -> None:
    backend = backends(sp.mha_pool("page_first"), **EMBEDDED)
    assert isinstance(backend, KvtierStorage)
    assert backend.pages is not None and backend.pages.layout.block_bytes == sp.mha_pool("page_first").page_size * (
        2 * sp.LAYERS * sp.HEADS * sp.HEAD_DIM * 4)


def test_without_interface_v1_sglang_is_told_to_set_it() -> None:
    extra = sp.extra_config()
    del extra["interface_v1"]
    with pytest.raises(ConfigError, match="interface_v1"):
        KvtierStorage(sp.storage_config(extra))


def test_the_flat_page_interface_is_refused(backends: Callable[..., Any]) -> None:
    backend = backends(sp.mha_pool("page_first"), **EMBEDDED)
    for call in (lambda: backend.get("k"), lambda: backend.batch_get(["k"]), lambda: backend.set("k"),
                 lambda: backend.batch_set(["k"])):
        with pytest.raises(ConfigError, match="interface_v1"):
            call()


@pytest.mark.parametrize(("make_pool", "message"), [
    (lambda: sp.mha_pool("page_head"), "page_head"),
    (lambda: sp.mha_pool("page_first", v_head_dim=sp.HEAD_DIM // 2), "one head size"),
    (lambda: sp.mha_pool("page_first", dtype=torch.float64), "dtype"),
])
def test_pools_kvtier_cannot_serve_are_refused(make_pool: Callable[[], Any], message: str) -> None:
    pool = make_pool()
    backend = KvtierStorage(sp.storage_config(sp.extra_config(**EMBEDDED)))
    with pytest.raises(LayoutMismatchError, match=message):
        backend.register_mem_pool_host(pool)
    with pytest.raises(ClosedError):
        backend.batch_exists(sp.page_hashes(1))


def test_a_daemon_of_another_layout_refuses_the_pool(daemons: dict[str, sp.Daemon]) -> None:
    backend = KvtierStorage(sp.storage_config(sp.extra_config(**on_daemon(daemons["mha"])), mla=True))
    with pytest.raises(LayoutMismatchError):
        backend.register_mem_pool_host(sp.mla_pool("page_first"))
    assert backend.store is None


def test_a_second_pool_or_a_sidecar_pool_is_refused(backends: Callable[..., Any]) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, **EMBEDDED)
    backend.register_mem_host_pool_v2(pool, "kv")
    with pytest.raises(LayoutMismatchError, match="mamba"):
        backend.register_mem_host_pool_v2(sp.mha_pool("page_first"), "mamba")
    with pytest.raises(ConfigError, match="already registered"):
        backend.register_mem_pool_host(sp.mha_pool("page_first"))


# -- the data path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sp.KINDS)
@pytest.mark.parametrize("layout", sp.HOST_LAYOUTS)
def test_pages_come_back_byte_identical(backends: Callable[..., Any], kind: str, layout: str) -> None:
    pool = sp.make_pool(kind, layout)
    backend = backends(pool, **EMBEDDED)
    hashes = fresh_hashes(3)
    written = pool.alloc(3 * sp.PAGE_TOKENS)
    sp.fill(pool, written, seed=1)
    assert backend.batch_set_v1(hashes, written) == [True] * 3
    assert backend.batch_exists(hashes) == 3 and backend.exists(hashes[0])
    read = pool.alloc(3 * sp.PAGE_TOKENS)
    assert backend.batch_get_v1(hashes, read) == [True] * 3
    assert_same_pages(pool, written, pool, read)
    assert backend.batch_set_v1(hashes, written) == [True] * 3  # already present: deduplicated
    assert backend.store.stats().put_deduplicated_blocks == 3


@pytest.mark.parametrize("kind", sp.KINDS)
def test_pages_of_one_host_layout_load_into_every_other(daemons: dict[str, sp.Daemon], backends: Callable[..., Any],
                                                        kind: str) -> None:
    for write_layout in sp.HOST_LAYOUTS:
        writer = sp.make_pool(kind, write_layout)
        hashes = fresh_hashes(2)
        written = writer.alloc(2 * sp.PAGE_TOKENS)
        sp.fill(writer, written, seed=2)
        assert backends(writer, **on_daemon(daemons[kind])).batch_set_v1(hashes, written) == [True, True]
        for read_layout in sp.HOST_LAYOUTS:
            reader = sp.make_pool(kind, read_layout)
            reader.alloc(sp.PAGE_TOKENS)  # other host indices than the writer's
            read = reader.alloc(2 * sp.PAGE_TOKENS)
            assert backends(reader, **on_daemon(daemons[kind])).batch_get_v1(hashes, read) == [True, True]
            assert_same_pages(writer, written, reader, read)


def test_another_process_reads_the_pages_byte_identical(daemons: dict[str, sp.Daemon],
                                                        backends: Callable[..., Any], tmp_path: Path) -> None:
    jobs, expected = [], {}
    for kind in sp.KINDS:
        pool = sp.make_pool(kind, "page_first")
        hashes = fresh_hashes(3)
        written = pool.alloc(3 * sp.PAGE_TOKENS)
        sp.fill(pool, written, seed=5)
        assert backends(pool, **on_daemon(daemons[kind])).batch_set_v1(hashes, written) == [True] * 3
        jobs.append({"kind": kind, "address": daemons[kind].address, "hashes": hashes})
        expected[kind] = torch.stack([sp.token_kv(pool, token) for token in written.tolist()])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    child = subprocess.run([sys.executable, str(Path(__file__).with_name("sglang_child.py")),
                            str(tmp_path / "jobs.json"), str(tmp_path / "found.pt")],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    found = torch.load(tmp_path / "found.pt")
    assert len(found) == len(sp.KINDS) * len(sp.HOST_LAYOUTS)
    for name, got in found.items():
        assert got["hits"] == 3 and got["results"] == [True] * 3, name
        assert torch.equal(got["kv"], expected[name.split("/")[0]]), name


def test_a_missing_page_ends_the_hit_and_is_reported(daemons: dict[str, sp.Daemon],
                                                     backends: Callable[..., Any]) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, **on_daemon(daemons["mha"]))
    hashes = fresh_hashes(4)
    written = pool.alloc(4 * sp.PAGE_TOKENS)
    sp.fill(pool, written, seed=3)
    stored = [0, 1, 3]
    pages = written.view(4, sp.PAGE_TOKENS)
    assert backend.batch_set_v1([hashes[i] for i in stored], pages[stored].flatten()) == [True] * 3
    assert backend.batch_exists(hashes) == 2
    read = pool.alloc(4 * sp.PAGE_TOKENS)
    before = [sp.token_kv(pool, token).clone() for token in read.tolist()]
    assert backend.batch_get_v1(hashes, read) == [True, True, False, False]
    assert_same_pages(pool, written[: 2 * sp.PAGE_TOKENS], pool, read[: 2 * sp.PAGE_TOKENS])
    for token, old in list(zip(read.tolist(), before, strict=True))[2 * sp.PAGE_TOKENS :]:
        assert torch.equal(sp.token_kv(pool, token), old)  # a missing page leaves the host pool untouched


def test_an_existence_check_is_one_daemon_round_trip(daemons: dict[str, sp.Daemon],
                                                     backends: Callable[..., Any]) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, **on_daemon(daemons["mha"]))
    hashes = fresh_hashes(5)
    written = pool.alloc(5 * sp.PAGE_TOKENS)
    assert backend.batch_set_v1(hashes, written) == [True] * 5
    connection = backend.store._conn
    calls: list[str] = []
    call = connection.call

    def recording(op: str, **fields: Any) -> Any:
        calls.append(op)
        return call(op, **fields)

    connection.call = recording
    assert backend.batch_exists([*hashes, *fresh_hashes(3)]) == 5
    assert calls == ["lookup"]


def test_an_evicted_page_is_reported_missing(backends: Callable[..., Any]) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, config={"host": {"capacity_bytes": "8KiB", "policy": "lru"},
                                     "transfer": {"backend": "cpu"}})
    first, second = fresh_hashes(2), fresh_hashes(2)  # two slots: the second prompt evicts the first
    assert backend.batch_set_v1(first, pool.alloc(2 * sp.PAGE_TOKENS)) == [True, True]
    assert backend.batch_set_v1(second, pool.alloc(2 * sp.PAGE_TOKENS)) == [True, True]
    assert backend.batch_exists(first) == 0
    assert backend.batch_get_v1(first, pool.alloc(2 * sp.PAGE_TOKENS)) == [False, False]


def test_a_corrupt_page_on_disk_is_reported_missing(backends: Callable[..., Any], tmp_path: Path) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, config={"host": {"capacity_bytes": "8KiB", "policy": "lru"},
                                     "transfer": {"backend": "cpu"},
                                     "disk": {"paths": [str(tmp_path)], "capacity_bytes": "1MiB",
                                              "region_bytes": "64KiB", "write_mode": "through",
                                              "admission": "admit_all", "direct_io": "off"}})
    first = fresh_hashes(1)
    written = pool.alloc(sp.PAGE_TOKENS)
    sp.fill(pool, written, seed=4)
    assert backend.batch_set_v1(first, written) == [True]
    assert backend.batch_set_v1(fresh_hashes(2), pool.alloc(2 * sp.PAGE_TOKENS)) == [True, True]
    backend.store.flush()
    read = pool.alloc(sp.PAGE_TOKENS)
    assert backend.batch_get_v1(first, read) == [True]  # promoted from disk
    assert_same_pages(pool, written, pool, read)
    assert backend.batch_set_v1(fresh_hashes(2), pool.alloc(2 * sp.PAGE_TOKENS)) == [True, True]
    data_file = tmp_path / "kvtier-data.bin"  # every entry of the disk tier, headers and payloads
    data_file.write_bytes(bytes(data_file.stat().st_size))
    assert backend.batch_get_v1(first, pool.alloc(sp.PAGE_TOKENS)) == [False]
    assert backend.store.stats().tiers["host"].detail["promotion_failed_blocks"] >= 1


@pytest.mark.parametrize("kind", sp.KINDS)
def test_ranks_share_mla_pages_but_not_mha_pages(daemons: dict[str, sp.Daemon], backends: Callable[..., Any],
                                                 kind: str) -> None:
    settings = on_daemon(daemons[kind])
    writer_pool, reader_pool = sp.make_pool(kind, "page_first"), sp.make_pool(kind, "page_first")
    rank0 = backends(writer_pool, tp_rank=0, tp_size=2, **settings)
    rank1 = backends(reader_pool, tp_rank=1, tp_size=2, **settings)
    hashes = fresh_hashes(2)
    assert rank0.batch_set_v1(hashes, writer_pool.alloc(2 * sp.PAGE_TOKENS)) == [True, True]
    assert rank1.batch_exists(hashes) == (2 if kind == "mla" else 0)
    # SGLang's storage writer for MLA is rank 0: another rank's write is acknowledged and skipped.
    others = fresh_hashes(1)
    assert rank1.batch_set_v1(others, reader_pool.alloc(sp.PAGE_TOKENS)) == [True]
    assert rank1.batch_exists(others) == (0 if kind == "mla" else 1)


def test_bad_host_indices_are_refused_before_anything_moves(backends: Callable[..., Any]) -> None:
    pool = sp.mha_pool("page_first")
    backend = backends(pool, **EMBEDDED)
    hashes = fresh_hashes(2)
    for indices, message in [(pool.alloc(sp.PAGE_TOKENS), "need 8 host indices"),
                             (torch.arange(1, 9), "does not start a page"),
                             (torch.arange(pool.size, pool.size + 8), "does not start a page"),
                             (torch.zeros(2, 4, dtype=torch.int64), "one-dimensional")]:
        for call in (backend.batch_set_v1, backend.batch_get_v1):
            with pytest.raises(InvalidInputError, match=message):
                call(hashes, indices)
    assert backend.batch_exists(hashes) == 0


def test_a_closed_backend_refuses_calls(backends: Callable[..., Any]) -> None:
    backend = backends(sp.mha_pool("page_first"), **EMBEDDED)
    backend.close()
    backend.close()
    with pytest.raises(ClosedError):
        backend.batch_exists(fresh_hashes(1))


def test_a_daemon_gone_is_a_miss_never_an_exception_in_sglangs_threads(backends: Callable[..., Any]) -> None:
    """SGLang's prefetch and backup threads end at an exception (and with them the other ranks' prefetch
    and the host pages they hold): a stopped daemon answers every call as a miss, counted."""
    daemon = sp.Daemon(sp.LAYOUT_ARGS["mha"], "--no-disk")
    try:
        pool = sp.mha_pool("page_first")
        backend = backends(pool, **on_daemon(daemon))
        hashes = fresh_hashes(2)
        written = pool.alloc(2 * sp.PAGE_TOKENS)
        sp.fill(pool, written, seed=9)
        assert backend.batch_set_v1(hashes, written) == [True, True]
    finally:
        daemon.stop()
    read = pool.alloc(2 * sp.PAGE_TOKENS)
    assert backend.batch_exists(hashes) == 0
    assert backend.batch_get_v1(hashes, read) == [False, False]
    assert backend.batch_set_v1(fresh_hashes(2), read) == [False, False]
    assert backend.store_failures == 3


def test_a_page_whose_lease_lapsed_during_its_copy_is_a_miss(daemons: dict[str, sp.Daemon],
                                                             backends: Callable[..., Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another SGLang thread's call times out and reopens the connection while a page is copied out of its
    slot: the lease may have lapsed with the old connection (the client keeps that connection open while it
    holds the lease, but a daemon may close it too), so the page is reported missing rather than trusted."""
    pool = sp.mha_pool("page_first")
    backend = backends(pool, **on_daemon(daemons["mha"]))
    hashes = fresh_hashes(2)
    written = pool.alloc(2 * sp.PAGE_TOKENS)
    sp.fill(pool, written, seed=11)
    assert backend.batch_set_v1(hashes, written) == [True, True]
    client = backend.store
    pages_type = type(backend.pages)
    real_block = pages_type.block

    def block_after_a_reconnect(pages: Any, view: torch.Tensor) -> torch.Tensor:
        if client.reconnects == 0:
            client._conn._broken = "timed out"  # as Connection.call marks a timed-out request
            client.lookup(backend.page_keys.keys(hashes[:1]))  # the next call reopens the connection
        return real_block(pages, view)

    monkeypatch.setattr(pages_type, "block", block_after_a_reconnect)
    # One page: its slot is resolved before the reconnect, which comes during its copy.
    assert backend.batch_get_v1(hashes[:1], pool.alloc(sp.PAGE_TOKENS)) == [False]
    assert client.reconnects == 1
    monkeypatch.undo()
    read = pool.alloc(2 * sp.PAGE_TOKENS)
    assert backend.batch_get_v1(hashes, read) == [True, True]
    assert_same_pages(pool, written, pool, read)
