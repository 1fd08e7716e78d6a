from __future__ import annotations

import json

import pytest

from kvtier.cli import main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


def test_bad_override_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", "host.capacity_bytes=-1", "bench", "host"]) == 2
    assert "kvtier: error: host.capacity_bytes" in capsys.readouterr().err
    assert main(["--set", "nonsense", "bench", "host"]) == 2


def test_bench_host_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["bench", "host", "--block-bytes", "65536", "--total-mib", "1", "--repeats", "1",
                   "--first-fill-mib", "4", "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["block_bytes"] == [65536] and result["lookup_hit_blocks"] == 8192
    assert {"host_put_gbps", "host_get_gbps", "memcpy_gbps", "key_derive_us_per_block", "first_fill_gbps",
            "first_fill_vs_memcpy", "first_fill_at_open_vs_memcpy", "first_fill_no_prefault_vs_memcpy"} <= set(result)


def test_only_the_chosen_command_is_imported() -> None:
    from kvtier.cli import _chosen

    assert _chosen(["--config", "x.toml", "--set", "a.b=1", "bench", "disk", "--json"]) == ["bench", "disk"]
    assert _chosen(["--log-level", "DEBUG", "serve", "--layout", "x"]) == ["serve"]
    assert _chosen(["--help"]) == []
