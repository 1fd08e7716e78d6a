"""``kvtier bench peers`` plumbing without vLLM: a stand-in peers Python, real child processes, and the report.

The stand-in answers like ``kvtier.bench.peers_child``: it writes a model directory, serves the spec's prompts
with made-up tokens, and dies like a peer that cannot run here (LMCache's configurations, an ``ImportError``),
so the records, the "not run, with the error" path, the token comparison and the report's section and plot are
checked on real subprocesses. The real engine run is ``make bench-peers`` (docs/benchmarks/peers.json).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kvtier.bench.host import measure_per_call
from kvtier.bench.peers import PEERS, Workload, error_line, run_peers, table
from kvtier.bench.peers_calls import run_calls
from kvtier.bench.plots import matplotlib_available
from kvtier.bench.report import per_call_section, write_report
from kvtier.errors import InvalidInputError
from kvtier.layout import KVLayout

SMALL_RUN = Path(__file__).parent / "fixtures" / "small-run"
STAND_IN = """#!{python}
import json, os, sys
if sys.argv[1:3] != ["-m", "kvtier.bench.peers_child"]:
    sys.exit("unexpected " + repr(sys.argv))
command, path = sys.argv[3], sys.argv[4]
if command == "model":
    os.makedirs(path)
    sys.exit(0)
spec = json.load(open(path))
if os.environ.get("LMCACHE_LOCAL_DISK"):
    print("ERROR: Traceback\\nRuntimeError: No supported cpu connector found.\\n. System will operate in degraded mode",
          file=sys.stderr)
elif os.environ.get("LMCACHE_CHUNK_SIZE"):
    print("Traceback (most recent call last):\\n  File x\\nImportError: lmcache.c_ops: needs CUDA", file=sys.stderr)
    sys.exit(1)
assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ["VLLM_TARGET_DEVICE"] == "cpu"
kvtier = "kv_transfer_config" in spec["engine_args"]
requests = [{{"tokens": [7] * spec["max_tokens"] if not kvtier or i else [9] * spec["max_tokens"],
              "cached": len(p) // 2 if kvtier and i else 0, "prompt_tokens": len(p), "ttft_s": 0.05 if kvtier else 0.1,
              "ttft_source": "vllm", "seconds": 0.2}} for i, p in enumerate(spec["prompts"])]
rss = (300 if kvtier else 200) * 2**20
print("RESULT " + json.dumps({{"init_s": 1.0, "requests": requests, "peak_rss_bytes": rss, "write_bytes": 4096}}))
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    path = tmp_path / "peers-python"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def test_every_configuration_is_reported_ran_or_not_run_with_its_error(stand_in: str) -> None:
    workload = Workload(conversations=2, turns=2, prefix_tokens=256, turn_tokens=64, max_tokens=3)
    result = run_peers(stand_in, workload, ("lmcache-cpu", "lmcache-disk", "kvtier-embedded"), timeout_s=120)
    records = {r["peer"]: r for r in result["records"]}
    assert list(records) == ["none", "lmcache-cpu", "lmcache-disk", "kvtier-embedded"]  # none always, first
    assert result["benchmark"] == "peers" and result["workload"]["requests"] == 4
    assert records["lmcache-cpu"]["status"] == "not run"
    assert records["lmcache-cpu"]["error"] == "ImportError: lmcache.c_ops: needs CUDA"
    assert "Traceback" in records["lmcache-cpu"]["error_tail"]
    # Ran, but logged that its offload failed and recomputed everything: not run, with the error it logged.
    assert records["lmcache-disk"]["status"] == "not run"
    assert records["lmcache-disk"]["error"].startswith("RuntimeError: No supported cpu connector found. (logged by")
    none, kvtier = records["none"], records["kvtier-embedded"]
    assert none["outputs_match"] is True and none["hit_ratio"] == 0.0 and none["ttft_median_ms"] == 100.0
    # The stand-in's first kvtier request answers other tokens: one differing request is a mismatch.
    assert kvtier["outputs_match"] is False and kvtier["mismatched_requests"] == [0]
    cached = sum(len(p) // 2 for p in workload.prompts()[1:])
    assert kvtier["restored_bytes"] == cached * 2048 and kvtier["host_memory_over_none_bytes"] == 100 * 2**20
    assert kvtier["hit_ratio"] == pytest.approx(cached / sum(len(p) for p in workload.prompts()), abs=1e-4)
    lines = table(result)
    assert lines[1] == "lmcache-cpu: not run: ImportError: lmcache.c_ops: needs CUDA"
    assert lines[3].startswith("kvtier-embedded: TTFT median 50.0 ms") and "+100 MiB over none" in lines[3]


def test_a_peers_python_that_cannot_start_reports_every_configuration_not_run(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named vllm' >&2\nexit 1\n")
    broken.chmod(0o755)
    records = run_peers(str(broken), Workload(conversations=1, turns=1), ("vllm-native",))["records"]
    assert [r["status"] for r in records] == ["not run", "not run"]
    assert records[1]["error"] == "the model could not be written: ModuleNotFoundError: No module named vllm"
    with pytest.raises(InvalidInputError, match="unknown peers"):
        run_peers(str(broken), Workload(), ("sglang",))


def test_error_line_finds_the_exception_not_the_last_log_line() -> None:
    text = "INFO start\nTraceback (most recent call last):\n  File \"x\"\nRuntimeError: no CUDA\nINFO exiting\n"
    assert error_line(text) == "RuntimeError: no CUDA"
    line = "torch.AcceleratorError: CUDA error: no device"
    assert error_line(f"{line}\n") == line
    assert error_line("[rank0]: Exception: only on CUDA\nx.py:1: FutureWarning: old\n") == "Exception: only on CUDA"
    assert error_line("just text\n") == "just text" and error_line("") == "no output"
    assert PEERS[0] == "none"


def test_the_report_shows_the_recorded_peers_table_not_run_reasons_and_losses(stand_in: str, tmp_path: Path) -> None:
    workload = Workload(conversations=2, turns=2, prefix_tokens=256, turn_tokens=64, max_tokens=3)
    result = run_peers(stand_in, workload, ("lmcache-cpu", "kvtier-embedded"), timeout_s=120)
    run_dir = tmp_path / "run"
    shutil.copytree(SMALL_RUN, run_dir)
    out = tmp_path / "docs" / "benchmarks.md"
    (out.parent / "benchmarks").mkdir(parents=True)
    (out.parent / "benchmarks" / "peers.json").write_text(json.dumps(result))
    text = write_report(run_dir, out).read_text()
    section = text[text.index("## kvtier against the peers in one engine"):]
    section = section[: section.index("\n## ", 1)]
    assert "make bench-peers (recorded in" in section
    assert "| kvtier-embedded | 50 | 38.6% | 1.1 | 300.0 | 100.0 | 0.0 | 0.0 | no |  |" in section
    assert "- `lmcache-cpu`: ImportError: lmcache.c_ops: needs CUDA" in section
    assert "kvtier loses on" not in section  # no peer ran to lose to
    assert "- Outputs of `kvtier-embedded` differ from the no-offload run in requests [0]." in section
    if matplotlib_available():
        assert (out.parent / "benchmarks" / "peers.png").is_file() and "benchmarks/peers.png" in section


def test_the_daemon_configuration_gets_the_embedded_disk_capacity_not_the_16_gib_default(tmp_path: Path) -> None:
    from kvtier.bench.peers import Runner
    from kvtier.config import StoreConfig
    from kvtier.daemon.client import Client
    from kvtier.layout import KVLayout

    runner = Runner(sys.executable, tmp_path, timeout_s=60)
    socket_path = str(tmp_path / "d.sock")
    daemon = runner.start_daemon(socket_path, pool_mib=64)  # the workload's default offload space
    try:
        layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16", block_tokens=16)
        with Client(layout, StoreConfig(), address=f"unix:{socket_path}") as client:
            disk = client.stats().tiers["disk"]
        # 4 x the pool, as the embedded configuration gets (entries of one block each, a page of header).
        assert disk.capacity_blocks * layout.block_bytes <= 256 * 2**20
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


class DictCache:
    """A peer for the per-call comparison: copies in and out of its own tensors (``corrupt``: reads back zeros)."""

    def __init__(self, corrupt: bool = False) -> None:
        self.held: dict[int, torch.Tensor] = {}
        self.corrupt = corrupt

    def put(self, chunk: torch.Tensor) -> object:
        self.held[len(self.held)] = chunk.clone()
        return len(self.held) - 1

    def get(self, handle: object, out: torch.Tensor) -> None:
        assert isinstance(handle, int)
        out.copy_(torch.zeros_like(out) if self.corrupt else self.held[handle])


def test_per_call_times_a_peer_beside_kvtier_and_reads_its_chunks_back() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=16)
    row = measure_per_call(layout, rounds=2, calls=2, num_workers=1, peers={"dict": DictCache()})
    assert row["chunk_bytes"] == layout.block_bytes
    assert row["dict_put_ms"] > 0 and row["put_vs_dict"] > 0 and row["get_vs_dict"] > 0
    assert {"dict_get_ms", "dict_put_vs_raw", "get_vs_dict"} <= set(row)
    with pytest.raises(RuntimeError, match="other bytes back from dict"):
        measure_per_call(layout, rounds=1, calls=1, num_workers=1, peers={"dict": DictCache(corrupt=True)})


def test_per_call_without_lmcache_is_reported_not_run() -> None:
    try:
        import lmcache  # noqa: F401
    except ImportError:
        record = run_calls(1, 1, ["1b"], 1)["records"][0]
        assert record["per_call"] == "1b" and record["status"] == "not run"
        assert record["error"].startswith("ModuleNotFoundError") and "Traceback" in record["error_tail"]
    else:
        pytest.skip("lmcache is installed here: make bench-peers runs it")


def test_per_call_records_from_the_peers_python_reach_the_report(stand_in: str, tmp_path: Path) -> None:
    workload = Workload(conversations=1, turns=1, prefix_tokens=256, turn_tokens=64, max_tokens=2)
    failed = run_peers(stand_in, workload, ("none",), timeout_s=120, per_call_rounds=1)["records"][-1]
    assert failed["per_call"] == "all" and failed["status"] == "not run" and "unexpected" in failed["error"]
    record = {"per_call": "1b", "status": "ok", "chunk_bytes": 8 << 20, "raw_1t_ms": 0.9, "raw_threads_ms": 0.8,
              "raw_torch_ms": 0.7, "raw_put_1t_ms": 0.95, "raw_put_threads_ms": 0.85, "raw_put_torch_ms": 0.75,
              "put_ms": 1.0, "lmcache_put_ms": 0.8, "get_ms": 0.7,
              "lmcache_get_ms": 0.75, "put_vs_lmcache": 1.25, "get_vs_lmcache": 0.933}
    assert table({"records": [record]}) == ["one 1b chunk per call: put kvtier 1.0 ms / LMCache 0.8 ms, get kvtier "
                                            "0.7 ms / LMCache 0.75 ms, raw copy 0.95 ms (put), 0.9 ms (get)"]
    lines = per_call_section([record, failed])
    assert "| 1b | 8.0 | 0.95 / 0.85 / 0.75 | 1 | 0.8 | 0.9 / 0.8 / 0.7 | 0.7 | 0.75 | 1.25 | 0.933 |" in lines
    assert any(line.startswith("- Not run: ") and "unexpected" in line for line in lines)
    assert "kvtier is the slower on: put of a 1b chunk (1.25x LMCache's)." in lines
