"""``kvtier bench remote`` end to end on small sizes: its records, fields and checks (figures are the
benchmark's business, not a test's)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from kvtier.bench.remote import bench_mode
from kvtier.cli import main
from kvtier.tiers.servers import LocalServers

if TYPE_CHECKING:
    from conftest import RemoteConfigFor

FIELDS = {"mode", "remote_put_gbps", "remote_put_copied_gbps", "remote_get_gbps", "raw_put_gbps", "raw_get_gbps",
          "lookup_p50_us", "lookup_p99_us", "put_vs_raw", "put_copied_vs_raw", "get_vs_raw", "lookup_requests",
          "wrong_blocks", "meets_targets"}


def test_a_record_per_mode_with_its_fields(servers: LocalServers, config_for: RemoteConfigFor) -> None:
    record = bench_mode(config_for(servers), len(servers.nodes), 64 * 1024, 4 * 1024 * 1024, 2, 20)
    assert set(record) >= FIELDS and record["mode"] == servers.mode and record["wrong_blocks"] == 0
    assert record["lookup_requests"] <= len(servers.nodes) and record["blocks"] == 64
    assert all(record[name] > 0 for name in ("remote_put_gbps", "remote_put_copied_gbps", "remote_get_gbps",
                                             "raw_put_gbps", "raw_get_gbps"))


def test_the_command_starts_its_own_servers_and_prints_json(capsys: pytest.CaptureFixture[str],
                                                           redis_single: LocalServers) -> None:
    assert main(["bench", "remote", "--modes", "single", "--block-bytes", "65536", "--total-mib", "4",
                 "--repeats", "1", "--lookups", "5", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [record["mode"] for record in records] == ["single"] and set(records[0]) >= FIELDS
