"""The disk benchmark runs end to end on a small size and reports every figure; its raw baselines and its
order of runs are what its docstring says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier.bench import disk as bench
from kvtier.bench.disk import run_disk_bench
from kvtier.disk import DiskTier, supports_direct_io

KiB = 1024


def test_disk_bench_reports_every_figure(tmp_path: Path) -> None:
    result = run_disk_bench(str(tmp_path), block_bytes=64 * 1024, total_bytes=2 * 1024 * 1024, repeats=1,
                            region_bytes=1024 * 1024, io_threads=2)
    for name in ("disk_write_gbps", "disk_read_gbps", "raw_write_gbps", "raw_read_gbps", "raw_write_1t_gbps",
                 "raw_read_1t_gbps", "restore_gbps", "write_vs_raw", "read_vs_raw", "write_vs_raw_1t",
                 "read_vs_raw_1t", "per_call_read_ms", "per_call_raw_read_ms", "per_call_read_vs_raw",
                 "lookup_host_us", "lookup_disk_us", "lookup_disk_vs_host"):
        assert isinstance(result[name], float) and result[name] > 0, name
    assert result["block_bytes"] == 64 * 1024 and isinstance(result["direct_io"], bool)
    assert result["lookup_prefix_blocks"] == 64
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


@pytest.mark.parametrize("threads", [1, 3])
def test_a_raw_write_covers_a_new_file_once_with_any_number_of_threads(tmp_path: Path, threads: int) -> None:
    path = str(tmp_path / "raw.bin")
    direct = supports_direct_io(str(tmp_path))
    total = 11 * 64 * KiB  # not a multiple of the threads: the last thread moves fewer I/Os
    with open(path, "wb") as old:  # zeros: a page the write missed would read back as zeros
        old.write(b"\0" * total)
    assert bench._raw_io(path, total, 64 * KiB, threads, direct, write=True) > 0
    assert os.stat(path).st_size == total
    with open(path, "rb") as written:
        data = written.read()
    pages = [data[i : i + 4 * KiB] for i in range(0, total, 4 * KiB)]
    assert all(any(page) for page in pages)  # every page written (random bytes), none left as preallocated
    assert bench._raw_io(path, total, 64 * KiB, threads, direct, write=False) > 0


def test_the_raw_run_with_the_tiers_threads_runs_next_to_the_tier_in_both_orders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    raw_io, read_all, flush = bench._raw_io, bench._read_all, DiskTier.flush

    def logged_raw_io(path: str, total: int, io_bytes: int, threads: int, direct: bool, write: bool) -> float:
        runs.append(f"raw {'write' if write else 'read'} {threads}t")
        return raw_io(path, total, io_bytes, threads, direct, write)

    def logged_flush(tier: DiskTier, deadline: float | None = None) -> None:
        runs.append("tier write")
        flush(tier, deadline)

    def logged_read_all(*args: object) -> None:
        runs.append("tier read")
        read_all(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "_raw_io", logged_raw_io)
    monkeypatch.setattr(bench, "_read_all", logged_read_all)
    monkeypatch.setattr(DiskTier, "flush", logged_flush)
    bench.run_disk_bench(str(tmp_path), block_bytes=64 * KiB, total_bytes=1024 * KiB, repeats=2,
                         region_bytes=512 * KiB, io_threads=2)
    raw_first = ["raw write 1t", "raw write 2t", "tier write", "raw read 1t", "raw read 2t", "tier read"]
    tier_first = ["tier write", "raw write 2t", "raw write 1t", "tier read", "raw read 2t", "raw read 1t"]
    # Then the restore (a read of its own) in each repeat.
    assert runs[:14] == [*raw_first, "tier read", *tier_first, "tier read"]
