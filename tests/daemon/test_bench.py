"""``kvtier bench daemon`` end to end at a tiny size: the record has every promised field."""

from __future__ import annotations

from kvtier.bench.daemon import measure
from kvtier.config import TransferConfig


def test_the_benchmark_record_has_every_field() -> None:
    record = measure([1], block_bytes=32 * 1024, batch=4, pool_bytes=4 * 2**20, seconds=0.2,
                     transfer=TransferConfig(backend="cpu"))
    for name in ("embedded_put_gbps", "embedded_get_gbps", "memcpy_gbps", "put_ratio_1_client",
                 "get_ratio_1_client"):
        assert record[name] > 0, name
    assert record["clients"] == [1]
    for name in ("daemon_put_gbps", "daemon_get_gbps", "lookup_p50_us", "lookup_p99_us", "paced_lookup_p99_us"):
        assert len(record[name]) == 1 and record[name][0] > 0, name
