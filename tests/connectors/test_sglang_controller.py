"""The SGLang backend under SGLang's own ``HybridCacheController`` storage threads, on the CPU.

Each test drives the controller's real prefetch, prefetch I/O, sync and backup threads (``sglang_controller``)
over the backend and SGLang's real host pools: fp8 formats, clear, MLA and disk tiers with tensor parallelism
(real rank processes with a gloo group for the controller's all-reduce), speculative decoding's draft pool,
batches larger than the host tier and SGLang's storage metrics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.sglang
if importlib.util.find_spec("sglang") is None:
    pytest.skip("needs SGLang installed (make test-sglang)", allow_module_level=True)

import sglang_controller as sc  # noqa: E402
import sglang_pools as sp  # noqa: E402  (before anything else imports SGLang: see its docstring)
from sglang.srt.mem_cache.hicache_storage import PoolName  # noqa: E402

from kvtier.errors import ClosedError, ConfigError, LayoutMismatchError  # noqa: E402

UINT8_LAYOUT = sp.LAYOUT_ARGS["mha"].replace("float32", "uint8")
_next_prompt = iter(range(1, 1 << 30))


def fresh_tokens(num_pages: int) -> list[int]:
    first = next(_next_prompt) * 100_000
    return list(range(first, first + num_pages * sp.PAGE_TOKENS))


def host_config(capacity: str = "64KiB", disk: Path | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"host": {"capacity_bytes": capacity, "policy": "lru"}, "transfer": {"backend": "cpu"}}
    if disk is not None:
        config["disk"] = {"paths": [str(disk)], "capacity_bytes": "2MiB", "region_bytes": "64KiB",
                          "write_mode": "through", "admission": "admit_all", "direct_io": "off"}
    return config


@pytest.fixture
def run() -> Iterator[Callable[..., tuple[Any, Any]]]:
    """Opens a backend over a pool and starts a controller over it; both are stopped at teardown."""
    opened: list[tuple[Any, Any]] = []

    def start(pool: Any, **settings: Any) -> tuple[Any, Any]:
        backend = sp.open_backend(pool, **settings)
        controller = sc.storage_controller(backend, pool)
        opened.append((backend, controller))
        return backend, controller

    yield start
    for backend, controller in opened:
        sc.stop(controller)
        backend.close()


@pytest.fixture(scope="module")
def uint8_daemon() -> Iterator[sp.Daemon]:
    daemon = sp.Daemon(UINT8_LAYOUT, "--no-disk")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def daemon() -> Iterator[sp.Daemon]:
    daemon = sp.Daemon(sp.LAYOUT_ARGS["mha"], "--no-disk")
    yield daemon
    daemon.stop()


def written_pages(pool: Any, num_pages: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = pool.alloc(num_pages * sp.PAGE_TOKENS)
    sp.fill(pool, indices, seed)
    return indices, torch.stack([sp.token_kv(pool, token).clone() for token in indices.tolist()])


def read_back(pool: Any, indices: torch.Tensor) -> torch.Tensor:
    return torch.stack([sp.token_kv(pool, token).clone() for token in indices.tolist()])


# -- 1. fp8 formats ------------------------------------------------------------------------------------------


def test_fp8_formats_named_by_setting_never_share_pages(uint8_daemon: sp.Daemon,
                                                        run: Callable[..., tuple[Any, Any]]) -> None:
    settings = {"store": "daemon", "address": uint8_daemon.address}
    tokens = fresh_tokens(3)
    e4m3_pool = sp.mha_pool("page_first", dtype=torch.uint8)
    _, e4m3 = run(e4m3_pool, kv_cache_dtype="fp8_e4m3", **settings)
    indices, expected = written_pages(e4m3_pool, 3, seed=11)
    assert sc.backup(e4m3, indices, tokens) == len(tokens)
    # The same server restarted with --kv-cache-dtype fp8_e5m2 must not read e4m3 bytes as its own.
    _, e5m2 = run(sp.mha_pool("page_first", dtype=torch.uint8), kv_cache_dtype="fp8_e5m2", **settings)
    assert sc.prefetch(e5m2, tokens)[:2] == (0, 0)
    again_pool = sp.mha_pool("page_first", dtype=torch.uint8)
    _, again = run(again_pool, kv_cache_dtype="fp8_e4m3", **settings)
    hit, read, got = sc.prefetch(again, tokens)
    assert (hit, read) == (len(tokens), len(tokens))
    assert torch.equal(read_back(again_pool, got), expected)


def test_the_fp8_format_is_read_from_sglangs_runtime_config(uint8_daemon: sp.Daemon, monkeypatch: pytest.MonkeyPatch,
                                                            run: Callable[..., tuple[Any, Any]]) -> None:
    import sglang.srt.runtime_context as runtime_context

    settings = {"store": "daemon", "address": uint8_daemon.address}
    tokens = fresh_tokens(2)
    monkeypatch.setattr(runtime_context, "get_model", lambda: SimpleNamespace(kv_cache_dtype="fp8_e5m2"))
    pool = sp.mha_pool("page_first", dtype=torch.uint8)
    _, e5m2 = run(pool, **settings)
    assert sc.backup(e5m2, written_pages(pool, 2, seed=12)[0], tokens) == len(tokens)
    monkeypatch.setattr(runtime_context, "get_model", lambda: SimpleNamespace(kv_cache_dtype="fp8_e4m3"))
    _, e4m3 = run(sp.mha_pool("page_first", dtype=torch.uint8), **settings)
    assert sc.prefetch(e4m3, tokens)[0] == 0
    monkeypatch.setattr(runtime_context, "get_model", lambda: SimpleNamespace(kv_cache_dtype="fp8_e5m2"))
    _, e5m2_again = run(sp.mha_pool("page_first", dtype=torch.uint8), **settings)
    assert sc.prefetch(e5m2_again, tokens)[0] == len(tokens)


@pytest.mark.parametrize(("settings", "error", "message"), [
    ({}, ConfigError, "kv_cache_dtype"),
    ({"kv_cache_dtype": "mxfp8"}, LayoutMismatchError, "block-scaled"),
    ({"kv_cache_dtype": "fp9"}, ConfigError, "not one of"),
])
def test_a_uint8_pool_of_unknown_or_unsupported_format_is_refused(settings: dict[str, Any], error: type[Exception],
                                                                  message: str) -> None:
    with pytest.raises(error, match=message):
        sp.open_backend(sp.mha_pool("page_first", dtype=torch.uint8), config=host_config(), **settings)


def test_a_format_that_contradicts_the_pool_is_refused() -> None:
    with pytest.raises(ConfigError, match="contradicts"):
        sp.open_backend(sp.mha_pool("page_first"), config=host_config(), kv_cache_dtype="fp8_e4m3")


# -- 2. clear ------------------------------------------------------------------------------------------------


def test_sglangs_clear_drops_the_pages_for_every_instance_on_the_daemon(daemon: sp.Daemon,
                                                                         run: Callable[..., tuple[Any, Any]]) -> None:
    settings = {"store": "daemon", "address": daemon.address}
    tokens = fresh_tokens(3)
    pool = sp.mha_pool("page_first")
    _, first = run(pool, **settings)
    other_pool = sp.mha_pool("page_first")
    other_backend, other = run(other_pool, **settings)  # another instance of the same model on the daemon
    assert sc.backup(first, written_pages(pool, 3, seed=21)[0], tokens) == len(tokens)
    assert sc.prefetch(other, tokens)[0] == len(tokens)
    assert first.clear_storage_backend() is True  # SGLang's own clear path: ends in backend.clear()
    stale = other_pool.alloc(3 * sp.PAGE_TOKENS)
    hashes = sp.page_hashes(3, first_token=tokens[0])
    assert other_backend.batch_get_v1(hashes, stale) == [False] * 3  # a read with no hit query first
    other_pool.free(stale)
    assert sc.prefetch(first, tokens)[:2] == (0, 0)
    assert sc.prefetch(other, tokens)[:2] == (0, 0)  # learnt from its own lookup's reply
    assert other_backend.exists(sp.page_hashes(1, first_token=tokens[0])[0]) is False
    indices, expected = written_pages(other_pool, 3, seed=22)
    assert sc.backup(other, indices, tokens) == len(tokens)  # pages saved after the clear are served again
    hit, read, got = sc.prefetch(first, tokens)
    assert (hit, read) == (len(tokens), len(tokens))
    assert torch.equal(read_back(pool, got), expected)


def test_a_clear_on_an_embedded_disk_store_survives_a_restart(run: Callable[..., tuple[Any, Any]],
                                                              tmp_path: Path) -> None:
    tokens = fresh_tokens(2)
    pool = sp.mha_pool("page_first")
    backend = sp.open_backend(pool, config=host_config(disk=tmp_path))
    controller = sc.storage_controller(backend, pool)
    assert sc.backup(controller, written_pages(pool, 2, seed=23)[0], tokens) == len(tokens)
    backend.clear()
    sc.stop(controller)
    backend.close()
    _, reopened = run(sp.mha_pool("page_first"), config=host_config(disk=tmp_path))
    assert sc.prefetch(reopened, tokens)[0] == 0


def test_clear_on_a_closed_backend_raises_so_sglang_reports_it() -> None:
    backend = sp.open_backend(sp.mha_pool("page_first"), config=host_config())
    backend.close()
    with pytest.raises(ClosedError):
        backend.clear()


# -- 3 and 4. tensor parallelism on embedded stores: real rank processes ---------------------------------------


@pytest.mark.parametrize(("kind", "disk"), [("mha", True), ("mla", True), ("mla", False)])
def test_two_ranks_with_embedded_stores_start_hit_and_restart(kind: str, disk: bool, tmp_path: Path) -> None:
    """MLA: SGLang backs up on rank 0 only, yet every rank hits. Disk: each rank gets a directory of its own."""
    config = host_config(disk=tmp_path / "disk" if disk else None)
    job = {"world": 2, "kind": kind, "pages": 3, "rendezvous": str(tmp_path / "rendezvous"), "restart": disk,
           "out": str(tmp_path / "result"), "kvtier": {"config": config}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = str(Path(__file__).with_name("sglang_ranks.py"))
    ranks = [subprocess.Popen([sys.executable, script, str(tmp_path / "job.json"), str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"}) for rank in range(2)]
    outputs = []
    for proc in ranks:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise
    for proc, output in zip(ranks, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    tokens = 3 * sp.PAGE_TOKENS
    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        for attempt in ("first", "restarted") if disk else ("first",):
            assert result[attempt] == {"hit_tokens": tokens, "read_tokens": tokens, "same_bytes": True}, (rank, result)
    if disk:
        assert sorted(path.name for path in (tmp_path / "disk").iterdir()) == ["rank-tp0of2-pp0of1-cp0of1-dp0",
                                                                              "rank-tp1of2-pp0of1-cp0of1-dp0"]


# -- 5. speculative decoding -----------------------------------------------------------------------------------


def test_a_draft_pool_is_refused_with_a_message_about_speculative_decoding() -> None:
    pool = sp.mha_pool("page_first")
    backend = sp.open_backend(pool, config=host_config())
    try:
        backend.register_mem_host_pool_v2(pool, PoolName.KV)
        with pytest.raises(LayoutMismatchError, match="speculative decoding"):
            backend.register_mem_host_pool_v2(sp.mha_pool("page_first", layers=1), PoolName.DRAFT)
    finally:
        backend.close()


@pytest.mark.parametrize("layout", sp.HOST_LAYOUTS)
def test_a_draft_layer_packed_into_the_target_pool_is_stored_with_its_pages(
        layout: str, run: Callable[..., tuple[Any, Any]]) -> None:
    pool = sp.mha_pool(layout, packed_draft_layers=1)
    backend, controller = run(pool, config=host_config())
    assert backend.pages.layout.num_layers == sp.LAYERS + 1
    tokens = fresh_tokens(2)
    indices, expected = written_pages(pool, 2, seed=24)
    assert sc.backup(controller, indices, tokens) == len(tokens)
    pool.free(indices)
    hit, read, got = sc.prefetch(controller, tokens)
    assert (hit, read) == (len(tokens), len(tokens))
    assert torch.equal(read_back(pool, got), expected)


# -- 6. batches larger than the host tier ----------------------------------------------------------------------


def test_a_prefix_larger_than_the_host_tier_is_stored_and_read_through_the_disk(
        run: Callable[..., tuple[Any, Any]], tmp_path: Path) -> None:
    pool = sp.mha_pool("page_first", device_tokens=512)
    _, controller = run(pool, config=host_config("32KiB", disk=tmp_path))  # 8 host slots
    tokens = fresh_tokens(150)  # two of SGLang's 128-page batches
    indices, expected = written_pages(pool, 150, seed=31)
    assert sc.backup(controller, indices, tokens) == len(tokens)
    pool.free(indices)
    hit, read, got = sc.prefetch(controller, tokens)
    assert (hit, read) == (len(tokens), len(tokens))
    assert torch.equal(read_back(pool, got), expected)


def test_without_a_lower_tier_the_leading_run_that_fits_is_stored(run: Callable[..., tuple[Any, Any]]) -> None:
    pool = sp.mha_pool("page_first", device_tokens=128)
    backend, controller = run(pool, config=host_config("32KiB"))
    tokens = fresh_tokens(20)
    indices, expected = written_pages(pool, 20, seed=32)
    hashes = sp.page_hashes(20, first_token=tokens[0])
    assert backend.batch_set_v1(hashes, indices) == [True] * 8 + [False] * 12
    pool.free(indices)
    hit, read, got = sc.prefetch(controller, tokens)
    assert (hit, read) == (8 * sp.PAGE_TOKENS, 8 * sp.PAGE_TOKENS)
    assert torch.equal(read_back(pool, got), expected[: 8 * sp.PAGE_TOKENS])


# -- 7. SGLang's storage metrics -------------------------------------------------------------------------------


def test_storage_metrics_report_each_read_and_write(run: Callable[..., tuple[Any, Any]]) -> None:
    pool = sp.mha_pool("page_first")
    backend, controller = run(pool, config=host_config(), metrics=True)
    tokens = fresh_tokens(3)
    assert sc.backup(controller, written_pages(pool, 3, seed=41)[0], tokens) == len(tokens)
    assert sc.prefetch(controller, tokens)[1] == len(tokens)
    metrics = backend.get_stats()
    assert (metrics.backup_pgs, metrics.prefetch_pgs) == ([3], [3])
    assert all(value > 0 for value in metrics.backup_bandwidth + metrics.prefetch_bandwidth)
    assert backend.get_stats().backup_pgs == []  # each call reports what happened since the last
    quiet, _ = run(sp.mha_pool("page_first"), config=host_config())
    assert quiet.get_stats() is None


# -- SGLang's failure injector ---------------------------------------------------------------------------------


def test_under_sglangs_failure_injector_every_page_read_is_the_page_written(
        monkeypatch: pytest.MonkeyPatch, run: Callable[..., tuple[Any, Any]]) -> None:
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE", "0.3")
    pool = sp.mha_pool("page_first", device_tokens=256)
    backend, controller = run(pool, config=host_config("256KiB"))
    assert type(backend).__name__ == "HiCacheStorageFailureInjector"
    for seed in range(8):
        tokens = fresh_tokens(4)
        indices, expected = written_pages(pool, 4, seed=50 + seed)
        stored = sc.backup(controller, indices, tokens)
        pool.free(indices)
        hit, read, got = sc.prefetch(controller, tokens)
        assert read <= hit <= len(tokens) and (stored == 0 or stored == len(tokens))
        if read:
            assert torch.equal(read_back(pool, got[:read]), expected[:read])
            pool.free(got)
    backend.clear()  # the injector hands clear() to the backend
    assert sc.prefetch(controller, tokens)[0] == 0
