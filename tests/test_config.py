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


def test_the_write_through_queue_is_sized_in_bytes_and_waited_for_in_milliseconds() -> None:
    config = load_config(None, {"host.write_through_queue_bytes": "64MiB", "host.write_through_wait_ms": "0"})
    assert config.host.write_through_queue_bytes == 64 << 20 and config.host.write_through_wait_ms == 0
    assert HostConfig().write_through_queue_bytes == 256 << 20 and HostConfig().write_through_wait_ms == 100


def test_writeback_buffer_is_whole_regions_at_least_three() -> None:
    assert DiskConfig(region_bytes="64MiB", writeback_buffer_bytes="1GiB").writeback_regions == 16
    assert DiskConfig(region_bytes="64MiB", writeback_buffer_bytes="100MiB").writeback_regions == 3
    with pytest.raises(ConfigError, match="writeback_buffer_bytes"):
        DiskConfig(writeback_buffer_bytes=0)


def test_a_small_tier_scales_its_regions_to_min_regions() -> None:
    disk = DiskConfig(paths=("/tmp/a",), capacity_bytes="1GiB", region_bytes="64MiB", min_regions=128)
    assert disk.scaled_region_bytes(4 << 20) == 8 << 20  # 128 regions of 8 MiB instead of 16 of 64 MiB
    assert disk.scaled_region_bytes(16 << 20) == 16 << 20  # never below one entry
    two_paths = DiskConfig(paths=("/tmp/a", "/tmp/b"), capacity_bytes="1GiB", min_regions=128)
    assert two_paths.scaled_region_bytes(4096) == 16 << 20  # 64 regions a path
    assert DiskConfig(capacity_bytes="16GiB", min_regions=128).scaled_region_bytes(4096) == 64 << 20
    with pytest.raises(ConfigError, match="min_regions"):
        DiskConfig(min_regions=0)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"host.pin": "'false'"}, "host.pin"), ({"host.prefault": "2"}, "host.prefault"),
    ({"daemon.max_frame_bytes": "10"}, "daemon.max_frame_bytes"), ({"disk.io_threads": "0"}, "disk.io_threads"),
    ({"disk.reinsert_hits": "-1"}, "disk.reinsert_hits"), ({"disk.write_budget_dwpd": "nan"}, "write_budget_dwpd"),
    ({"host.capacity_bytes": "0"}, "host.capacity_bytes"), ({"remote.timeout_ms": "1.5"}, "remote.timeout_ms"),
    ({"daemon.default_disk": "1"}, "daemon.default_disk"), ({"disk.paths": "[1, 2]"}, "disk.paths"),
    ({"daemon.layout": "{num_layers = 2}"}, "daemon.layout"), ({"disk.codec": "true"}, "disk.codec"),
    ({"host.write_through_queue_bytes": "0"}, "host.write_through_queue_bytes"),
    ({"host.write_through_wait_ms": "-1"}, "host.write_through_wait_ms"),
])
def test_overrides_are_checked_by_type_and_range_naming_the_key(overrides: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize(("toml", "key"), [
    ('[host]\npin = "false"\n', "host.pin"), ("[host]\nprefault = 2\n", "host.prefault"),
    ("[daemon]\nsocket_path = 5\n", "daemon.socket_path"), ("[daemon]\ntcp_token = 1234\n", "daemon.tcp_token"),
    ("[daemon]\nconnect = 7\n", "daemon.connect"), ("[daemon]\nmax_frame_bytes = 10\n", "daemon.max_frame_bytes"),
    ('[disk]\npaths = "xy"\nwipe_incompatible = "yes"\n', "disk.wipe_incompatible"),
    ("[remote]\nurls = [3]\n", "remote.urls"), ('hash_algo = 5\n', "hash_algo"),
    ("[daemon]\nlayout = {num_layers = 2, dtype = 'float32'}\n", "daemon.layout"),
])
def test_toml_values_are_checked_by_type_and_range_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "kvtier.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_a_string_list_setting_takes_one_string_as_one_item_and_strings_stay_strings() -> None:
    config = load_config(None, {"disk.paths": "xy", "remote.urls": "redis://h:1", "daemon.tcp_token": "1234",
                                "daemon.socket_path": "5", "disk.write_budget_dwpd": "2"})
    assert config.disk.paths == ("xy",) and config.remote.urls == ("redis://h:1",)
    assert config.daemon.tcp_token == "1234" and config.daemon.socket_path == "5"
    assert config.disk.write_budget_dwpd == 2.0
    assert load_config(None, {"disk.paths": '["/a", "/b"]'}).disk.paths == ("/a", "/b")
    assert DiskConfig(paths="/one").paths == ("/one",)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"host\.pin"):
        HostConfig(pin="false")  # type: ignore[arg-type]


def test_a_new_plain_field_is_checked_from_its_annotation() -> None:
    from dataclasses import dataclass

    from kvtier.config_fields import check_fields

    @dataclass(frozen=True)
    class Section:
        count: int = 1
        ratio: float = 0.5
        enabled: bool = False
        name: str = ""

        def __post_init__(self) -> None:
            check_fields(self, "section")

    for bad in ({"count": "3"}, {"count": -1}, {"ratio": float("inf")}, {"enabled": "no"}, {"name": 5}):
        with pytest.raises(ConfigError, match=rf"section\.{next(iter(bad))}"):
            Section(**bad)  # type: ignore[arg-type]
    assert Section(ratio=1).ratio == 1.0
