"""Trace replay: trace parsing, the region log, hand-computed replays, the README's reference figures."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kvtier.bench.replay import format_table, run_replay, run_table
from kvtier.bench.traces import SHAPES, generate, write_trace
from kvtier.disk.admission import AdmitAll
from kvtier.errors import ConfigError, InvalidInputError
from kvtier.replay import DriveModel, RegionLog, Trace, load_trace, replay_belady, replay_single, replay_tiered

REPO = Path(__file__).resolve().parent.parent
MOONCAKE = next((path for path in (Path(os.environ.get("KVTIER_MOONCAKE_TRACE", "")),
                                   REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl")
                 if path.is_file()), None)
needs_mooncake = pytest.mark.skipif(MOONCAKE is None, reason="the Mooncake synthetic trace is not on this machine")


def _write_trace(path: Path, requests: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"timestamp": i, "input_length": 512 * len(ids), "output_length": 1,
                                        "hash_ids": ids}) + "\n" for i, ids in enumerate(requests)))
    return path


# A trace small enough to replay by hand (see each test).
SMALL = Trace([[1, 2], [1, 2], [3], [1, 2]])


def test_load_trace_reads_requests_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2, 3], [1, 4]])
    path.write_text(path.read_text() + "\n   \n")
    trace = load_trace(path)
    assert trace.requests == [[1, 2, 3], [1, 4]]
    assert (trace.unique_blocks, trace.referenced_blocks) == (4, 5)


def test_load_trace_groups_trace_blocks_into_bigger_blocks(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2, 3, 4, 5], [1, 2]])
    assert load_trace(path, block_tokens=1024).requests == [[2, 4, 5], [2]]
    with pytest.raises(ConfigError):
        load_trace(path, block_tokens=700)


@pytest.mark.parametrize("bad_line", ['{"hash_ids": [1, 2', '[1, 2]', '{"input_length": 3}', '{"hash_ids": []}',
                                      '{"hash_ids": [1, "2"]}', '{"hash_ids": [true]}'])
def test_load_trace_names_the_malformed_line(tmp_path: Path, bad_line: str) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1], [2]])
    path.write_text(path.read_text() + bad_line + "\n")
    with pytest.raises(InvalidInputError, match=r"t\.jsonl:3: "):
        load_trace(path)


def test_load_trace_refuses_a_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"cannot read trace .*missing\.jsonl"):
        load_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInputError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")


def test_region_log_evicts_the_oldest_region_whole_and_reinserts_blocks_read_enough() -> None:
    log = RegionLog(4, blocks_per_region=2, reinsert_hits=2)
    for key in (1, 2, 3, 4, 5):  # 5 opens a third region: region [1, 2] goes
        log.write(key)
    assert (1 not in log, 2 not in log, len(log)) == (True, True, 3)
    log.read(3)
    log.read(3)
    log.read(4)
    log.write(6)
    log.write(7)  # region [3, 4] goes: 3 was read twice and comes back, 4 once and is dropped
    assert sorted(k for k in range(1, 8) if k in log) == [3, 5, 6, 7]
    assert (log.blocks_written, log.blocks_reinserted) == (8, 1)


def test_region_log_leaves_blocks_host_ram_holds_to_host_ram() -> None:
    # Blocks 1 and 2 were read; host RAM holds 1 when their region is evicted: only 2 is reinserted, and 1
    # is written again only if the host's eviction offers it and admission takes it.
    log = RegionLog(4, blocks_per_region=2, reinsert_hits=1, held_above={1})
    for key in (1, 2, 3, 4):
        log.write(key)
    log.read(1)
    log.read(2)
    log.write(5)
    assert (1 not in log, 2 in log, log.blocks_reinserted, log.left_to_host) == (True, True, 1, 1)


def test_region_log_frees_a_sealed_region_left_without_a_live_block() -> None:
    log = RegionLog(6, blocks_per_region=2, reinsert_hits=0)
    for key in (1, 2, 3, 4, 5):  # regions [1, 2] and [3, 4] sealed, 5 in the open one
        log.write(key)
    log.drop(3)
    assert log.regions_freed == 0  # 4 still lives there
    log.drop(4)
    log.write(6)
    log.write(7)  # seals [5, 6]: two regions sealed of three, so [1, 2] stays (it would go with [3, 4] held)
    assert (1 in log, 2 in log, log.regions_freed, log.blocks_moved_to_host) == (True, True, 1, 2)
    log.write(8)
    log.drop(7)
    log.drop(8)
    log.write(9)  # the open region [7, 8] lost every block: freed at its seal, not kept until its turn
    assert (1 in log, log.regions_freed, sorted(k for k in range(10) if k in log)) == (True, 2, [1, 2, 5, 6, 9])


def test_region_log_without_reinsertion_and_smaller_than_a_region() -> None:
    log = RegionLog(3, blocks_per_region=16, reinsert_hits=0)
    for key in range(4):
        log.write(key)
        log.read(key)
        log.read(key)
    assert (log.num_regions, sorted(k for k in range(4) if k in log)) == (1, [3])
    with pytest.raises(ConfigError):
        RegionLog(0)


def test_single_tier_lru_by_hand() -> None:
    # Capacity 2. r1 misses and caches 2 then 1; r2 hits both; r3 misses and 3 evicts 2. r4 hits 1 and
    # misses 2, then caching 2 evicts 1 and caching 1 evicts 3: 3 hits of 7.
    assert replay_single(SMALL, 2, "lru") == pytest.approx(3 / 7)


def test_belady_by_hand() -> None:
    # Capacity 2: 3 is never used again, so Belady bypasses it and r4 hits both blocks: 4 hits of 7.
    assert replay_belady(SMALL, 2) == pytest.approx(4 / 7)
    assert replay_belady(SMALL, 1) <= replay_belady(SMALL, 2) <= replay_belady(SMALL, 3)
    assert replay_belady(SMALL, 3) == pytest.approx(4 / 7)  # every repeat reference hits: the infinite cache


def test_tiered_replay_by_hand_admit_all() -> None:
    # One host block (LRU) over a 4-block disk. r1: 2 is cached then evicted by 1 and written to disk.
    # r2: 1 hits in host, 2 on disk; putting 2 back evicts 1 (written); putting 1 back evicts 2 (on disk).
    result = replay_tiered(Trace([[1, 2], [1, 2]]), 1, 4, policy="lru", admission="admit_all", blocks_per_region=4)
    assert (result.host_hits, result.disk_hits, result.disk_blocks_written) == (1, 1, 2)
    assert (result.disk_offers, result.disk_admitted, result.block_hit_ratio) == (2, 2, 0.5)


class _ExclusiveAdmitAll(AdmitAll):
    @property
    def exclusive(self) -> bool:
        return True


def test_tiered_replay_by_hand_exclusive() -> None:
    # As admit-all by hand, but r2's disk hit on 2 drops the disk's copy: evicting 1 writes 1, then evicting 2
    # offers it again (the disk no longer holds it) and writes it: one write more, the same hits.
    result = replay_tiered(Trace([[1, 2], [1, 2]]), 1, 4, policy="lru", admission=_ExclusiveAdmitAll(),
                           blocks_per_region=4)
    assert (result.host_hits, result.disk_hits, result.disk_moved_to_host) == (1, 1, 1)
    assert (result.disk_offers, result.disk_admitted, result.disk_blocks_written) == (3, 3, 3)


def test_tiered_replay_scales_regions_down_to_min_regions_as_the_tier_does() -> None:
    # Host 1 block (LRU) over a 4-block disk: 1-5 are written as 6 arrives. One region of 4 is evicted whole
    # to make room for 5; four regions of 1 lose only block 1, so 3 still hits.
    trace = Trace([[1], [2], [3], [4], [5], [6], [3]])
    settings: dict[str, Any] = {"policy": "lru", "admission": "admit_all", "blocks_per_region": 4, "reinsert_hits": 0}
    assert replay_tiered(trace, 1, 4, min_regions=1, **settings).disk_hits == 0
    assert replay_tiered(trace, 1, 4, min_regions=4, **settings).disk_hits == 1
    with pytest.raises(ConfigError, match="min_regions"):
        replay_tiered(trace, 1, 4, min_regions=0)


def test_tiered_replay_by_hand_reject_first() -> None:
    # r1's eviction of 2 is its first sighting: rejected. r2: 1 hits in host, 2 misses; evicting 1, then 2,
    # offers blocks sighted twice: both written, too late for a hit.
    result = replay_tiered(Trace([[1, 2], [1, 2]]), 1, 4, policy="lru", admission="reject_first")
    assert (result.host_hits, result.disk_hits, result.disk_blocks_written) == (1, 0, 2)


def test_tiered_replay_without_a_disk_is_the_host_cache_alone() -> None:
    result = replay_tiered(SMALL, 2, 0, policy="lru")
    assert (result.disk_hits, result.disk_blocks_written) == (0, 0)
    assert result.block_hit_ratio == pytest.approx(replay_single(SMALL, 2, "lru"))
    with pytest.raises(ConfigError):
        replay_tiered(SMALL, 2, 0, admission="sometimes")
    with pytest.raises(ConfigError):
        replay_tiered(SMALL, 0, 4)


def test_run_replay_reports_tiers_baselines_and_writes(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2], [1, 2], [3], [1, 2]] * 3)
    result = run_replay(path, host_frac=0.34, disk_blocks=2, policy="lru", admission="admit_all")
    assert (result["requests"], result["unique_blocks"], result["host_blocks"], result["disk_blocks"]) == (12, 3, 1, 2)
    assert result["block_hit_ratio"] == pytest.approx(result["host_hit_ratio"] + result["disk_hit_ratio"], abs=1e-4)
    assert set(result["baselines"]) == {"lru", "s3fifo", "arc", "belady"}
    assert result["baseline_capacity_blocks"] == 3
    assert result["baseline_disk_blocks_written"] == result["disk_blocks_written"]
    assert json.loads(json.dumps(result)) == result
    assert "baselines" not in run_replay(path, host_blocks=1, disk_blocks=2, baselines=False)


@pytest.mark.parametrize("sizes", [{}, {"host_blocks": 1, "host_frac": 0.5, "disk_blocks": 1},
                                   {"host_blocks": 1}, {"host_frac": 1.5, "disk_blocks": 1},
                                   {"host_frac": 0.01, "disk_blocks": 1}])
def test_run_replay_refuses_bad_capacities(tmp_path: Path, sizes: dict[str, float]) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2], [3]])
    with pytest.raises(ConfigError):
        run_replay(path, **sizes)  # type: ignore[arg-type]


def test_bench_script_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("replay_script", REPO / "bench" / "replay.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2], [1, 2], [3]])
    assert main(["--trace", str(path), "--host-blocks", "1", "--disk-blocks", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 3
    assert main(["--trace", str(tmp_path / "nope"), "--host-blocks", "1", "--disk-blocks", "2"]) == 2
    assert "cannot read trace" in capsys.readouterr().err


@needs_mooncake
def test_mooncake_reference_figures_and_admission_goals() -> None:
    assert MOONCAKE is not None
    trace = load_trace(MOONCAKE)
    unique = trace.unique_blocks
    assert (unique, len(trace.requests)) == (43_924, 3_993)
    one_percent = int(0.01 * unique)
    # data/README.md: LRU 3.8% and Belady 17.0% at 1% of the unique blocks.
    assert round(100 * replay_single(trace, one_percent, "lru"), 1) == 3.8
    assert round(100 * replay_belady(trace, one_percent), 1) == 17.0
    host = int(0.005 * unique)
    adaptive = replay_tiered(trace, host, one_percent)
    admit_all = replay_tiered(trace, host, one_percent, admission="admit_all")
    assert adaptive.block_hit_ratio > admit_all.block_hit_ratio
    assert adaptive.disk_blocks_written <= admit_all.disk_blocks_written / 3


def test_load_trace_keeps_timestamps_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1], [2]])
    assert load_trace(path).timestamps_ms == [0.0, 1.0]
    path.write_text(path.read_text() + '{"hash_ids": [3]}\n')
    assert load_trace(path).timestamps_ms == []  # a line without one: the trace has no clock
    for bad in ('"0"', "true", "NaN"):
        path.write_text(f'{{"timestamp": {bad}, "hash_ids": [3]}}\n')
        with pytest.raises(InvalidInputError, match=r"t\.jsonl:1: 'timestamp'"):
            load_trace(path)


# One host block (LRU) over a 4-block disk, admit-all: every request evicts one block to the disk.
CHAIN = Trace([[1], [2], [3], [4]], timestamps_ms=[0, 0, 1000, 1000])


def test_clocked_replay_drops_what_the_buffer_cannot_hold_by_hand() -> None:
    # Blocks of 100 bytes, a buffer of 100 bytes, a drive of 100 B/s. r2 evicts 1 (buffered); r3 at 1 s
    # evicts 2 (the drive wrote 1 meanwhile); r4 at 1 s evicts 3: the buffer still holds 2, so 3 is dropped.
    drive = DriveModel(block_bytes=100, write_bytes_per_s=100, writeback_buffer_bytes=100)
    result = replay_tiered(CHAIN, 1, 4, policy="lru", admission="admit_all", blocks_per_region=4, drive=drive)
    assert (result.disk_admitted, result.disk_blocks_written, result.dropped_buffer_full) == (3, 2, 1)
    # Twice as fast a clock (time_scale 0.5): r3 comes at 0.5 s, with half of 1 still unwritten: 2 is dropped too.
    fast = DriveModel(100, 100, 100, time_scale=0.5)
    assert replay_tiered(CHAIN, 1, 4, policy="lru", admission="admit_all", drive=fast).dropped_buffer_full == 2
    roomy = DriveModel(100, 100, 300)
    result = replay_tiered(CHAIN, 1, 4, policy="lru", admission="admit_all", drive=roomy)
    assert (result.disk_blocks_written, result.dropped_buffer_full) == (3, 0)


def test_clocked_replay_drops_blocks_over_the_write_budget_by_hand() -> None:
    # A budget of 100 B/s saved up for one second is a bucket of one 100-byte block: r2's eviction takes it,
    # r3's (1 s later) finds it refilled, r4's (same instant) finds it empty.
    drive = DriveModel(100, 1e9, 1 << 20, budget_bytes_per_s=100, budget_burst_s=1)
    result = replay_tiered(CHAIN, 1, 4, policy="lru", admission="admit_all", drive=drive)
    assert (result.disk_blocks_written, result.dropped_over_budget, result.dropped_buffer_full) == (2, 1, 0)


def test_clocked_replay_spends_the_budget_accrued_between_bursts() -> None:
    # Every 10 s a request of 5 new blocks evicts 5 blocks at once; the budget is one block a second. The
    # budget accrues while no request comes: 50 blocks offered over 90 s fit in 90 s of budget plus the
    # 20 s saved at the start. A bucket of one second (before) wrote one block a request.
    trace = Trace([[10 * r + b for b in range(5)] for r in range(10)], [10_000.0 * r for r in range(10)])
    accrued = DriveModel(100, 1e9, 1 << 20, budget_bytes_per_s=100, budget_burst_s=20)
    result = replay_tiered(trace, 1, 100, policy="lru", admission="admit_all", drive=accrued)
    assert (result.disk_admitted, result.dropped_over_budget) == (49, 0)
    one_second = replay_tiered(trace, 1, 100, policy="lru", admission="admit_all",
                               drive=DriveModel(100, 1e9, 1 << 20, budget_bytes_per_s=100, budget_burst_s=1))
    assert one_second.disk_blocks_written == 10
    # Spending never runs ahead of the budget: 5 s saved up, then the accrual.
    tight = replay_tiered(trace, 1, 100, policy="lru", admission="admit_all",
                          drive=DriveModel(100, 1e9, 1 << 20, budget_bytes_per_s=20, budget_burst_s=5))
    assert tight.disk_blocks_written <= 1 + (90 * 20) // 100


def test_clocked_replay_refuses_a_trace_without_times_and_bad_drives() -> None:
    with pytest.raises(ConfigError, match="timestamp"):
        replay_tiered(SMALL, 1, 4, drive=DriveModel(100, 100, 100))
    bad_fields: list[dict[str, Any]] = [{"block_bytes": 0}, {"write_bytes_per_s": 0}, {"time_scale": float("inf")},
                                        {"budget_bytes_per_s": -1}, {"budget_burst_s": -1}]
    for bad in bad_fields:
        with pytest.raises(ConfigError):
            DriveModel(**{"block_bytes": 1, "write_bytes_per_s": 1, "writeback_buffer_bytes": 1, **bad})


def test_run_replay_on_the_clock_reports_drops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1], [2], [3], [4], [5]])  # one request a millisecond
    result = run_replay(path, host_blocks=1, disk_blocks=4, policy="lru", admission="admit_all", baselines=False,
                        drive_write_bytes_per_s=1000, block_bytes=1000, writeback_buffer_bytes=2000)
    assert (result["disk_admitted"], result["dropped_buffer_full"], result["dropped_over_budget"]) == (4, 2, 0)
    dwpd = run_replay(path, host_blocks=1, disk_blocks=4, policy="lru", admission="admit_all", baselines=False,
                      drive_write_bytes_per_s=1e12, block_bytes=21_600, write_budget_dwpd=1.0)
    assert dwpd["write_budget_bytes_per_s"] == 1  # 4 blocks of 21,600 bytes once a day
    assert dwpd["dropped_over_budget"] == 3
    # The DWPD of a named drive, 10x the replay's disk, and 9,000 s of it saved up (4 blocks): all are written.
    drive = run_replay(path, host_blocks=1, disk_blocks=4, policy="lru", admission="admit_all", baselines=False,
                       drive_write_bytes_per_s=1e12, block_bytes=21_600, write_budget_dwpd=1.0,
                       drive_bytes=864_000, write_budget_burst_s=9000)
    assert (drive["write_budget_bytes_per_s"], drive["dropped_over_budget"]) == (10, 0)
    with pytest.raises(ConfigError, match="at most one"):
        run_replay(path, host_blocks=1, disk_blocks=4, drive_write_bytes_per_s=1, write_budget_bytes_per_s=1,
                   write_budget_dwpd=1)
    spec = importlib.util.spec_from_file_location("replay_script", REPO / "bench" / "replay.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--trace", str(path), "--host-blocks", "1", "--disk-blocks", "4", "--no-baselines", "--admission",
            "admit_all", "--policy", "lru", "--drive-write-rate", "1000", "--block-bytes", "1000",
            "--writeback-buffer", "2000"]
    assert script.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped_buffer_full"] == 2
    assert script.main(argv) == 0
    assert "2 blocks dropped with the buffer full" in capsys.readouterr().out


@pytest.mark.parametrize("shape", SHAPES)
def test_generated_traces_are_seeded_chained_and_in_the_replay_format(tmp_path: Path, shape: str) -> None:
    trace, outputs = generate(shape, seed=3)
    again, _ = generate(shape, seed=3)
    assert again == trace and generate(shape, seed=4)[0] != trace
    assert trace.timestamps_ms == sorted(trace.timestamps_ms) and len(outputs) == len(trace.requests)
    # Chained prefix ids: an id always comes after the same id (its whole prefix is the same).
    parent: dict[int, int] = {}
    for request in trace.requests:
        for before, block in zip([-1, *request], request, strict=False):
            assert parent.setdefault(block, before) == before
    write_trace(tmp_path / "t.jsonl", trace, outputs)
    assert load_trace(tmp_path / "t.jsonl") == trace
    assert 5_000 < trace.unique_blocks < 100_000  # small enough for a replay table in minutes


def test_replay_table_reports_each_trace_and_size_against_the_baselines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_trace(tmp_path / "t.jsonl", [[1, 2], [1, 2], [3], [1, 2], [4, 5], [1, 2]] * 5)
    rows = run_table([("t", load_trace(path))], host_frac=0.2, disk_fracs=(0.2, 0.4), policy="lru")
    assert [(row["trace"], row["disk_frac"], row["disk_blocks"]) for row in rows] == [("t", 0.2, 1), ("t", 0.4, 2)]
    for row in rows:
        assert row["kvtier_minus_best"] == pytest.approx(row["kvtier"] - max(row["lru"], row["s3fifo"], row["arc"]),
                                                         abs=1e-4)
        assert row["kvtier"] <= row["belady"] + 1e-9
        assert row["writes_of_admit_all"] == pytest.approx(
            row["disk_blocks_written"] / row["admit_all_disk_blocks_written"], abs=1e-3)
    assert format_table(rows).count("\n| t | ") == 2
    spec = importlib.util.spec_from_file_location("replay_script", REPO / "bench" / "replay.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--table", "--trace", str(path), "--trace", str(path), "--host-frac", "0.2",
                        "--disk-fracs", "0.4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    saved = tmp_path / "traces"
    assert script.main(["--table", "--shape", "agent", "--seed", "2", "--disk-fracs", "0.01", "--save-traces",
                        str(saved)]) == 0
    assert "| agent (seed 2) | 1% |" in capsys.readouterr().out
    assert load_trace(saved / "agent-seed2.jsonl") == generate("agent", 2)[0]
    for bad in (["--table", "--trace", str(path), "--disk-blocks", "2"], ["--table"],
                ["--table", "--trace", str(path), "--disk-fracs", "1%"],
                ["--trace", str(path), "--trace", str(path), "--host-blocks", "1", "--disk-blocks", "1"]):
        assert script.main(bad) == 2
        assert "replay: error:" in capsys.readouterr().err
