"""kvtier's vLLM connector inside a real vLLM engine: offline ``LLM`` runs of a tiny random-weight Llama on
vLLM's CPU build (``make test-vllm-engine``), each engine in its own process (vllm_engine_child.py).

Every run is compared token for token with the same prompts on an engine without the connector; hits are
counted from kvtier's own statistics and from vLLM's ``num_cached_tokens`` (prefix caching is off, so the
connector is the only source of cached tokens). Cases: the embedded store under vLLM's default engine
(engine core and worker in separate processes), a restart restoring from the disk tier, two engine processes
sharing ``kvtier serve``, and a store block deleted between the scheduler's lookup and the load with async
scheduling on (issue 18, case 1).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm_engine

from vllm_engine_model import write_tiny_llama  # noqa: E402

from kvtier.config import StoreConfig  # noqa: E402
from kvtier.daemon.stats_cmd import fetch  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
BLOCK = 128  # vLLM's CPU block size: one kvtier chunk by default
PREFIX = 2000
CHUNKS = PREFIX // BLOCK  # whole chunks of the shared prefix
RUN_TIMEOUT_S = 600


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(3, 512) for _ in range(PREFIX)]
    tails = {name: [rng.randrange(3, 512) for _ in range(40)] for name in ("a", "b", "c", "d", "e")}
    prompts = {name: prefix + tail for name, tail in tails.items()}
    # A prompt longer than the hit plus the token budget (256 below): chunked prefill after the load.
    prompts["long"] = prefix + [rng.randrange(3, 512) for _ in range(1200)]
    return prompts


PROMPTS = _prompts()


def run_engine(tmp: Path, name: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One engine in its own process; its RESULT line as a dict (the engine's log on failure)."""
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    child_env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "connectors"), str(HERE),
                                               child_env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "vllm_engine_child.py"), str(spec_path)], env=child_env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine {name} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return result


def phase(*names: str, max_tokens: int = 8) -> dict[str, Any]:
    return {"prompts": [PROMPTS[name] for name in names], "max_tokens": max_tokens}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-engine")


@pytest.fixture(scope="module")
def model(work: Path) -> str:
    return str(write_tiny_llama(work / "tiny-llama"))


@pytest.fixture(scope="module")
def baseline(work: Path, model: str) -> dict[str, list[int]]:
    """Greedy tokens of every prompt on an engine without the connector."""
    names = list(PROMPTS)
    result = run_engine(work, "baseline", {"model": model, "phases": [phase(*names)]})
    assert all(output["cached"] == 0 for output in result["phases"][0])
    return {name: output["tokens"] for name, output in zip(names, result["phases"][0], strict=True)}


def embedded_extra(disk: Path) -> dict[str, Any]:
    # Write-through: every saved block reaches the disk tier at once, so a restart finds all of them.
    return {"config": {"host": {"capacity_bytes": "64MiB"},
                       "disk": {"paths": [str(disk)], "capacity_bytes": "256MiB", "write_mode": "through"}}}


def test_embedded_store_under_the_default_engine_then_a_restart_from_disk(work: Path, model: str,
                                                                          baseline: dict[str, list[int]]) -> None:
    """vLLM's default engine (engine core and worker in separate processes) with the embedded store: hits from
    the host pool, identical tokens; a second engine on the same disk tier restores from disk."""
    disk = work / "embedded-disk"
    first = run_engine(work, "embedded", {"model": model, "extra": embedded_extra(disk), "stats": "engine",
                                          "phases": [phase("a", "b", "c")]})
    a, b, c = first["phases"][0]
    assert [a["tokens"], b["tokens"], c["tokens"]] == [baseline["a"], baseline["b"], baseline["c"]]
    assert a["cached"] == 0 and b["cached"] == c["cached"] == CHUNKS * BLOCK
    stats = first["stats"]
    assert stats["hit_blocks"] >= 2 * CHUNKS and stats["put_blocks"] >= CHUNKS
    assert stats["tiers"]["host"]["hit_blocks"] >= 2 * CHUNKS

    second = run_engine(work, "embedded-restart", {"model": model, "extra": embedded_extra(disk),
                                                   "stats": "engine", "phases": [phase("d")]})
    (d,) = second["phases"][0]
    assert d["tokens"] == baseline["d"]
    assert d["cached"] == CHUNKS * BLOCK, "the restarted engine did not restore the prefix from disk"
    assert second["stats"]["tiers"]["disk"]["hit_blocks"] >= CHUNKS


@pytest.fixture
def daemon(work: Path) -> Iterator[str]:
    socket_path = str(work / "kvtier.sock")
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--socket", socket_path, "--pool", "64MiB",
                             "--disk", str(work / "daemon-disk"), "--metrics-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "connectors")])})
    deadline = time.monotonic() + 60
    while True:
        try:
            fetch(f"unix:{socket_path}", StoreConfig())
            break
        except Exception:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "daemon exited"
            assert time.monotonic() < deadline, "kvtier serve did not start"
            time.sleep(0.2)
    yield socket_path
    proc.terminate()
    proc.wait(60)


def test_two_engines_share_kvtier_serve(work: Path, model: str, baseline: dict[str, list[int]], daemon: str) -> None:
    """Two engine processes on one ``kvtier serve``: the second is served what the first saved."""
    extra = {"store": "daemon", "config": {"daemon": {"connect": f"unix:{daemon}"}}}
    first = run_engine(work, "daemon-1", {"model": model, "extra": extra, "phases": [phase("a")]})
    second = run_engine(work, "daemon-2", {"model": model, "extra": extra, "stats": daemon,
                                           "phases": [phase("b", "c")]})
    assert first["phases"][0][0]["tokens"] == baseline["a"]
    b, c = second["phases"][0]
    assert [b["tokens"], c["tokens"]] == [baseline["b"], baseline["c"]]
    assert b["cached"] == c["cached"] == CHUNKS * BLOCK
    assert second["stats"]["hit_blocks"] >= 2 * CHUNKS


def test_block_deleted_between_lookup_and_load_under_async_scheduling(work: Path, model: str,
                                                                      baseline: dict[str, list[int]]) -> None:
    """Issue 18, case 1: the load misses a block the lookup promised, with async scheduling on and a prompt
    longer than the hit plus the token budget (chunks computed in the steps after the load). vLLM recomputes;
    nothing computed over the missing block is stored, so the same prompt served from kvtier afterwards
    produces the right tokens."""
    extra = {"instance": "dropping", "config": {"host": {"capacity_bytes": "64MiB"}}}
    result = run_engine(work, "async-drop", {
        "model": model, "extra": extra, "stats": "embedded", "async_scheduling": True, "drop_after_lookup": 3,
        "max_num_batched_tokens": 256, "phases": [phase("a"), phase("long"), phase("long", "e")],
    }, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert len(result["dropped"]) == 1, "the test did not delete a block between lookup and load"
    (a,), (failed,), (again, e) = result["phases"]
    assert a["tokens"] == baseline["a"]
    assert failed["tokens"] == baseline["long"]
    assert failed["cached"] < CHUNKS * BLOCK, "the deleted block was not a miss"
    # The chunks computed after the failure were saved and are served now: they must be the right KV.
    assert again["cached"] >= (len(PROMPTS["long"]) - 1) // BLOCK * BLOCK
    assert [again["tokens"], e["tokens"]] == [baseline["long"], baseline["e"]]
