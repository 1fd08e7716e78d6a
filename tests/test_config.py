from __future__ import annotations

from pathlib import Path

import pytest

from kvtier import ConfigError, DaemonConfig, DiskConfig, HostConfig, StoreConfig, load_config
from kvtier.config import parse_bytes


def test_defaults_are_valid() -> None:
    config = load_config()
    assert config == StoreConfig()
    assert config.host.capacity_bytes == 1 << 30 and config.disk.paths == () and config.hash_algo == "sha256"


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.toml"
    path.write_text('hash_algo = "blake3"\n[host]\ncapacity_bytes = "64MiB"\npolicy = "arc"\n'
                    '[disk]\npaths = ["/tmp/a", "/tmp/b"]\nregion_bytes = "16MiB"\n')
    config = load_config(path, {"host.policy": "lru", "disk.reinsert_hits": "3", "transfer.num_workers": "4"})
    assert config.hash_algo == "blake3"
    assert config.host == HostConfig(capacity_bytes=64 << 20, policy="lru")
    assert config.disk.paths == ("/tmp/a", "/tmp/b") and config.disk.region_bytes == 16 << 20
    assert config.disk.reinsert_hits == 3 and config.transfer.num_workers == 4


@pytest.mark.parametrize(("text", "expected"), [(4096, 4096), ("4KiB", 4096), ("1.5GiB", 3 << 29), ("2 MB", 2_000_000)])
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text, "x") == expected


@pytest.mark.parametrize("text", ["lots", "4XB", True, 1.5, None])
def test_parse_bytes_refuses(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(text, "x")


@pytest.mark.parametrize("overrides", [
    {"host.colour": "red"}, {"hosts.policy": "lru"}, {"host.policy": "fifo"}, {"disk.direct_io": "maybe"},
    {"disk.region_bytes": "1000"}, {"hash_algo": "md5"}, {"daemon.tcp_port": "80000"}, {"daemon.tcp_port": "9000"},
    {"transfer.backend": "tpu"}, {"unknown": "1"},
])
def test_bad_settings_name_the_field(overrides: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[host\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(bad)
    bad.write_text("host = 3\n")
    with pytest.raises(ConfigError, match="table"):
        load_config(bad)


def test_dataclasses_validate_directly() -> None:
    with pytest.raises(ConfigError):
        DiskConfig(capacity_bytes="1MiB", region_bytes="2MiB")
    with pytest.raises(ConfigError):
        DaemonConfig(tcp_port=9000)
    assert DaemonConfig(tcp_port=9000, tcp_token="t").tcp_host == "127.0.0.1"


def test_write_budget_in_drive_writes_per_day_or_bytes_per_second() -> None:
    disk = DiskConfig(paths=("/a", "/b"), capacity_bytes="432MiB", write_budget_dwpd=2)
    assert disk.budget_bytes_per_s == 2 * 2 * 432 * 1024 * 1024 // 86_400  # from both paths' capacity
    assert DiskConfig(write_budget_bytes_per_s="1MiB").budget_bytes_per_s == 1024 * 1024
    assert DiskConfig().budget_bytes_per_s == 0
    with pytest.raises(ConfigError, match="at most one"):
        DiskConfig(write_budget_bytes_per_s=1000, write_budget_dwpd=1.0)
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="write_budget_dwpd"):
            DiskConfig(write_budget_dwpd=bad)  # type: ignore[arg-type]


def test_writeback_buffer_is_whole_regions_at_least_three() -> None:
    assert DiskConfig(region_bytes="64MiB", writeback_buffer_bytes="1GiB").writeback_regions == 16
    assert DiskConfig(region_bytes="64MiB", writeback_buffer_bytes="100MiB").writeback_regions == 3
    with pytest.raises(ConfigError, match="writeback_buffer_bytes"):
        DiskConfig(writeback_buffer_bytes=0)
