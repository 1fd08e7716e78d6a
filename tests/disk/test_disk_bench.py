"""The disk benchmark runs end to end on a small size and reports every figure."""

from __future__ import annotations

from pathlib import Path

from kvtier.bench.disk import run_disk_bench


def test_disk_bench_reports_every_figure(tmp_path: Path) -> None:
    result = run_disk_bench(str(tmp_path), block_bytes=64 * 1024, total_bytes=2 * 1024 * 1024, repeats=1,
                            region_bytes=1024 * 1024, io_threads=2)
    for name in ("disk_write_gbps", "disk_read_gbps", "raw_write_gbps", "raw_read_gbps", "restore_gbps",
                 "write_vs_raw", "read_vs_raw", "per_call_read_ms", "per_call_raw_read_ms", "per_call_read_vs_raw",
                 "lookup_host_us", "lookup_disk_us", "lookup_disk_vs_host"):
        assert isinstance(result[name], float) and result[name] > 0, name
    assert result["block_bytes"] == 64 * 1024 and isinstance(result["direct_io"], bool)
    assert result["lookup_prefix_blocks"] == 64
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
