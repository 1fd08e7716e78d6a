"""``kvtier bench all``: the plan, record parsing, and a tiny real run that survives failing steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.bench.all import Step, find_trace, parse_records, plan, run_all
from kvtier.bench.plots import matplotlib_available
from kvtier.bench.progress import track
from kvtier.cli import BENCHMARKS, build_parser

TINY_HOST = ("bench", "host", "--block-bytes", "65536", "131072", "--total-mib", "1", "--repeats", "1", "--json")


def test_parse_records_reads_every_shape_and_skips_text() -> None:
    assert parse_records('{\n  "a": 1,\n  "b": [1, 2]\n}\n') == [{"a": 1, "b": [1, 2]}]
    assert parse_records('[{"a": 1}, {"a": 2}, 3]') == [{"a": 1}, {"a": 2}]
    assert parse_records('summary line {not json\n{"a": 1}\n{"a": 2}\n') == [{"a": 1}, {"a": 2}]
    assert parse_records("") == [] and parse_records("no records [here") == []


def test_plan_covers_every_benchmark_and_skips_replay_without_a_trace(tmp_path: Path) -> None:
    steps = plan(True, tmp_path, None)
    assert {step.benchmark for step in steps} == {"host", "disk", "gather", "daemon", "ttft", "replay",
                                                  "alternatives", "peers", "scaling", "remote"}
    assert all(step.skip_reason for step in steps if step.benchmark == "replay")
    assert all(step.argv[0] == "bench" and step.argv[1] in BENCHMARKS | {"remote": ("", "")} for step in steps)
    assert all("--json" in step.argv for step in steps)
    full = plan(False, tmp_path, tmp_path / "t.jsonl")
    assert len([s for s in full if s.benchmark == "replay"]) == 5 and len(full) > len(steps)
    remote = next(step for step in steps if step.benchmark == "remote")
    assert remote.optional or remote.skip_reason


def test_find_trace_prefers_the_explicit_path(tmp_path: Path) -> None:
    assert find_trace(str(tmp_path / "x.jsonl")) == tmp_path / "x.jsonl"
    found = find_trace(None)
    assert found is None or found.name == "mooncake_synthetic_trace.jsonl"


def test_the_cli_knows_all_and_report() -> None:
    args = build_parser(["bench", "all"]).parse_args(["bench", "all", "--quick", "--out", "x"])
    assert args.quick and args.out == "x"
    assert build_parser(["bench", "report"]).parse_args(["bench", "report", "d"]).directory == "d"


def test_progress_prints_a_line_per_step_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track([1, 2, 3], "thing")) == [1, 2, 3]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == ["thing: 1/3", "thing: 2/3", "thing: 3/3"]


def test_bench_all_writes_records_survives_failures_and_draws(tmp_path: Path) -> None:
    steps = [
        Step("host", "host", TINY_HOST, 300),
        Step("broken", "replay", ("bench", "replay", "--trace", str(tmp_path / "none.jsonl"), "--host-blocks", "1",
                                  "--disk-blocks", "0", "--json"), 300),
        Step("no-such", "remote", ("bench", "no-such-benchmark", "--json"), 300, optional=True),
        Step("slow", "host", ("bench", "host", "--total-mib", "4096", "--json"), 0.5),
        Step("absent", "replay", ("bench", "replay"), 300, skip_reason="no trace here"),
    ]
    info = run_all(steps, tmp_path / "out", "kvtier bench all --out out")
    out = tmp_path / "out"
    statuses = {step["step"]: step["status"] for step in info["steps"]}
    assert statuses == {"host": "ok", "broken": "failed", "no-such": "skipped", "slow": "failed", "absent": "skipped"}
    host = json.loads((out / "host.json").read_text())
    assert host["command"] == "kvtier " + " ".join(TINY_HOST) and host["returncode"] == 0
    assert host["records"][0]["block_bytes"] == [65536, 131072] and host["seconds"] > 0
    broken = json.loads((out / "broken.json").read_text())
    assert broken["returncode"] == 2 and "exit status 2" in broken["error"]
    assert "cannot read trace" in broken["error"]
    assert "timed out" in json.loads((out / "slow.json").read_text())["error"]
    assert json.loads((out / "absent.json").read_text())["reason"] == "no trace here"
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "kvtier bench all --out out" and run["machine"]["cpu_cores"] >= 1
    assert run["environment"]["OMP_WAIT_POLICY"]
    if matplotlib_available():
        assert run["plots"] == ["tier_throughput.png"] and (out / "tier_throughput.png").stat().st_size > 1000
