"""``kvtier bench report`` on a small recorded run (fixtures/small-run): tables, targets, plots, GPU check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvtier.bench.plots import draw_all, matplotlib_available
from kvtier.bench.report import render_records, write_report
from kvtier.bench.results import load_results
from kvtier.bench.targets import MET, MISSED, NOT_MEASURED, Target, check_targets
from kvtier.cli import main
from kvtier.errors import InvalidInputError

FIXTURE = Path(__file__).parent / "fixtures" / "small-run"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_report_has_commands_machine_targets_and_every_benchmark(run_dir: Path, tmp_path: Path) -> None:
    out = write_report(run_dir, tmp_path / "docs" / "benchmarks.md")
    text = out.read_text()
    assert text.startswith("# kvtier benchmarks")
    assert "kvtier bench all --quick --out small-run\nkvtier bench report " in text  # the commands, at the top
    assert "| CPU | AMD EPYC |" in text and "| GPU | none |" in text and "0.3 / 0.6" in text
    assert "| environment | OMP_WAIT_POLICY=PASSIVE |" in text
    for title in ("## Host tier", "## Disk tier", "## Daemon", "## Time to first token", "## Cache policy on a trace",
                  "## kvtier against the alternatives", "## Scaling", "## Remote tier", "## GPU check"):
        assert title in text, title
    assert "| 1048576 | 9.995 | 10.36 | 15.4 | 0.649 | 0.673 |" in text  # host's aligned lists as columns
    assert "| kvtier-host+disk |" in text and "| safetensors |" in text  # one row per alternative
    assert "`gather` failed: exit status 1" in text and "the gather benchmark broke" in text
    assert "`remote` skipped: remote did not run here" in text
    assert "growing: key_derive_us_per_block (4.8x), lookup_us_per_block (2.5x)" in text
    assert "1 clients 677 us, 2 clients 740 us, 4 clients 3181 us" in text


def test_report_renders_gpu_check_sections_generically(run_dir: Path, tmp_path: Path) -> None:
    text = write_report(run_dir, tmp_path / "b.md").read_text()
    gpu = text[text.index("## GPU check"):]
    assert "| device | NVIDIA H200 |" in gpu and "### store" in gpu and "| put_vs_raw | 0.95 |" in gpu
    assert "### ttft" in gpu and "| 32768 |" in gpu and "### tests" in gpu


def test_targets_say_met_missed_and_not_measured(run_dir: Path) -> None:
    by_area: dict[str, list[Target]] = {}
    for t in check_targets(load_results(run_dir)):
        by_area.setdefault(t.area, []).append(t)
    # 0.649x at 1 MiB; no per-call figures in this older run; first fill 0.62x
    assert [t.status for t in by_area["host tier"]] == [MISSED, NOT_MEASURED, MET]
    assert "1 thread only" in by_area["host tier"][0].measured  # the older run had no N-thread baseline
    # 256 KiB missed, 2 MiB met (0.985x, 1.011x); no prefix lookup in this older run
    assert [t.status for t in by_area["disk tier"]] == [MISSED, MET, NOT_MEASURED]
    assert [t.status for t in by_area["daemon"]] == [MISSED, MISSED]  # get 0.77x; p99 3181 us at 4 clients
    assert by_area["remote"][0].status == NOT_MEASURED and "did not run" in by_area["remote"][0].measured
    replay = {t.target: t.status for t in by_area["replay"]}
    assert replay["never below the best classic baseline (0.3-point slack)"] == MISSED  # 5.75 vs 6.72 at 1%
    assert replay["at 1% disk, >= 0.5x Belady"] == MISSED
    assert replay["disk writes <= 1/3 of admit-all at 1%"] == MET
    # The fixture's TTFT records carry no CPU host-restore ratio: that target says not measured.
    assert [t.status for t in by_area["ttft"]] == [MET, MISSED, NOT_MEASURED]
    assert by_area["decode (GPU)"][0].status == NOT_MEASURED  # no gpu-check.json targets in the fixture
    assert [t.status for t in by_area["ttft (GPU)"]] == [MET, MISSED]  # 4.0x at 8k, 4.5x at 32k


def test_per_call_and_prefix_lookup_targets_read_the_new_fields(tmp_path: Path) -> None:
    host = {"benchmark": "host", "block_bytes": [1048576], "put_vs_memcpy": [0.9], "get_vs_memcpy": [0.85],
            "memcpy_gbps": [10.0], "memcpy_threads_gbps": [12.0], "transfer_workers": 2,
            **{f"per_call_1b_{f}": v for f, v in (("put_vs_raw", 1.1), ("get_vs_raw", 1.05), ("put_ms", 0.9),
                                                   ("get_ms", 0.85), ("raw_1t_ms", 0.8), ("raw_threads_ms", 0.82),
                                                   ("raw_put_1t_ms", 0.81), ("raw_put_threads_ms", 0.83),
                                                   ("raw_torch_ms", 0.79), ("raw_put_torch_ms", 0.8))},
            **{f"per_call_7b_{f}": v for f, v in (("put_vs_raw", 1.3), ("get_vs_raw", 1.0), ("put_ms", 4.0),
                                                   ("get_ms", 3.1), ("raw_1t_ms", 3.1), ("raw_threads_ms", 3.2),
                                                   ("raw_put_1t_ms", 3.1), ("raw_put_threads_ms", 3.2),
                                                   ("raw_torch_ms", 3.0), ("raw_put_torch_ms", 3.0))}}
    disk = [{"benchmark": "disk", "block_bytes": 262144, "write_vs_raw": 0.92, "read_vs_raw": 0.95,
             "lookup_disk_vs_host": ratio, "lookup_disk_us": 50.0, "lookup_host_us": 42.0} for ratio in (1.4, 1.19)]
    steps = [{"step": "host", "benchmark": "host", "records": [host]},
             {"step": "disk-256k", "benchmark": "disk", "records": disk}]
    (tmp_path / "run.json").write_text(json.dumps({"command": "kvtier bench all", "steps": steps}))
    for step in steps:
        (tmp_path / f"{step['step']}.json").write_text(json.dumps(step))
    targets = [t for t in check_targets(load_results(tmp_path)) if t.area in ("host tier", "disk tier")]
    # 1 MiB batch, 1B per call, 7B per call (put 1.3x); two disk records at 0.92x/0.95x; the prefix lookup
    assert [t.status for t in targets] == [MET, MET, MISSED, MET, MET, MET]
    assert "12.0 GB/s 2 threads" in targets[0].measured and "1B" in targets[1].target
    assert targets[5].measured.startswith("1.19x")  # the best of the runs


def test_targets_of_an_empty_run_are_not_measured(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"command": "kvtier bench all", "steps": []}))
    targets = check_targets(load_results(tmp_path))
    assert targets and all(t.status == NOT_MEASURED for t in targets)


def test_render_records_groups_lists_flattens_objects_and_transposes_wide_tables() -> None:
    record = {"n": [1, 2], "gbps": [0.5, 1.5], "nested": {"a": 1}, "single": [3], "text": "x|y"}
    one = "\n".join(render_records([record]))
    assert "| n | gbps |" in one and "| 2 | 1.5 |" in one
    assert "| nested.a | 1 |" in one and "| single | [3] |" in one and "x\\|y" in one
    few = "\n".join(render_records([{"size": 1, "hit": 0.5, "same": "s"}, {"size": 2, "hit": 0.25, "same": "s"}]))
    assert "| size | hit |" in few and "| 2 | 0.25 |" in few and "Same in every record: `same` = s" in few
    wide = "\n".join(render_records([{f"f{i}": i * j for i in range(12)} for j in (1, 2)]))
    assert "| field | #1 | #2 |" in wide and "| f11 | 11 | 22 |" in wide
    assert render_records([]) == []


@pytest.mark.skipif(not matplotlib_available(), reason="matplotlib (the plots extra) is not installed")
def test_plots_are_drawn_and_linked_from_the_report(run_dir: Path, tmp_path: Path) -> None:
    drawn = draw_all(run_dir)
    assert set(drawn) == {"tier_throughput.png", "ttft.png", "replay_hit_ratio.png", "replay_disk_writes.png",
                          "alternatives.png", "scaling_index.png", "scaling_prompt.png", "daemon_clients.png"}
    stale = tmp_path / "docs" / "benchmarks" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    text = write_report(run_dir, tmp_path / "docs" / "benchmarks.md").read_text()
    assert sorted(p.name for p in stale.parent.iterdir()) == sorted(drawn)
    for name in drawn:
        assert f"(benchmarks/{name})" in text
        assert (stale.parent / name).read_bytes()[:4] == b"\x89PNG"


def test_plots_skip_records_without_their_fields(tmp_path: Path) -> None:
    (tmp_path / "host.json").write_text(json.dumps({"step": "host", "benchmark": "host", "status": "ok",
                                                    "records": [{"block_bytes": [1, 2], "other": [1, 2]}]}))
    assert draw_all(tmp_path) == []


def test_report_command_and_bad_directories(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "report", str(run_dir), "--output", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text().startswith("# kvtier benchmarks")
    assert main(["bench", "report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="no `kvtier bench all` output"):
        write_report(empty, tmp_path / "x.md")
    assert not (tmp_path / "x.md").exists()


def test_unreadable_step_files_are_reported_not_fatal(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "daemon.json").write_text("{not json")
    (run_dir / "gpu-check.json").write_text("[")
    text = write_report(run_dir, tmp_path / "b.md").read_text()
    assert "`daemon` failed: daemon.json could not be read" in text
    assert "gpu-check.json could not be read" in text


def test_gpu_check_targets_and_the_cpu_restore_enter_the_table(tmp_path: Path) -> None:
    from kvtier.bench.results import Results

    gpu = {"targets": {"decode_slowdown_during_save": {"value": 1.04, "target": "<= 1.1", "met": True},
                       "store_put_vs_raw": {"value": 0.7, "target": ">= 0.9", "met": False}}}
    ttft = {"benchmark": "ttft", "records": [{"source": "host", "device": "cpu", "prompt_tokens": 2048,
                                              "restore_vs_raw": 0.42}]}
    results = Results(tmp_path, {}, [{"benchmark": "ttft", "records": [ttft]}], gpu_check=gpu)
    by_target = {t.target: t for t in check_targets(results)}
    assert by_target["a decode step during a concurrent save <= 1.1x as long"].status == MET
    assert by_target["Store.put from the device >= 0.9x raw pinned copies"].status == MISSED
    assert by_target["vLLM worker load >= 0.8x raw"].status == NOT_MEASURED
    cpu = by_target["on the CPU, restore from the host tier >= 0.5x a raw copy of the same bytes"]
    assert cpu.status == MISSED and "0.42x" in cpu.measured


def test_the_per_call_comparison_with_lmcache_is_a_target(tmp_path: Path) -> None:
    records = [{"per_call": "1b", "status": "ok", "put_vs_lmcache": 0.95, "get_vs_lmcache": 0.9, "put_ms": 0.5,
                "get_ms": 0.4, "lmcache_put_ms": 0.53, "lmcache_get_ms": 0.44},
               {"per_call": "7b", "status": "ok", "put_vs_lmcache": 1.1, "get_vs_lmcache": 0.9},
               {"per_call": "all", "status": "not run", "error": "ModuleNotFoundError: lmcache"},
               {"peer": "none", "status": "ok"}]
    steps = [{"step": "peers", "benchmark": "peers", "records": records}]
    (tmp_path / "run.json").write_text(json.dumps({"command": "kvtier bench all", "steps": steps}))
    (tmp_path / "peers.json").write_text(json.dumps(steps[0]))
    targets = [t for t in check_targets(load_results(tmp_path)) if t.area == "host tier vs LMCache"]
    assert [t.status for t in targets] == [MET, MISSED]
    assert targets[0].measured.startswith("1B-like: put 0.95x, get 0.90x LMCache's (kvtier put 0.5 ms")
