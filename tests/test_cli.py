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
                   "--first-fill-mib", "4", "--per-call-rounds", "1", "--per-call-calls", "2", "--per-call-layouts",
                   "1b", "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert result["block_bytes"] == [65536] and result["lookup_hit_blocks"] == 8192
    assert {"host_put_gbps", "host_get_gbps", "memcpy_gbps", "memcpy_threads_gbps", "put_vs_memcpy_1t",
            "key_derive_us_per_block", "first_fill_gbps", "first_fill_vs_memcpy", "first_fill_at_open_vs_memcpy",
            "first_fill_no_prefault_vs_memcpy"} <= set(result)
    # The ratio is against the better raw copy (one thread or as many as the store's workers).
    best = max(result["memcpy_gbps"][0], result["memcpy_threads_gbps"][0], result["torch_copy_gbps"][0])
    assert result["put_vs_memcpy"][0] == round(result["host_put_gbps"][0] / best, 3)
    assert result["per_call_1b_chunk_bytes"] == 16 * 8 * 64 * 2 * 2 * 256
    assert {"per_call_1b_put_ms", "per_call_1b_get_ms", "per_call_1b_raw_1t_ms", "per_call_1b_raw_threads_ms",
            "per_call_1b_raw_put_1t_ms", "per_call_1b_raw_put_threads_ms", "per_call_1b_raw_torch_ms",
            "per_call_1b_raw_put_torch_ms", "torch_copy_gbps", "per_call_1b_put_vs_raw",
            "per_call_1b_get_vs_raw"} <= set(result)
    # A put against the raw copies into cold buffers, a get against those between warm ones.
    raw_put = min(result[f"per_call_1b_raw_put_{way}_ms"] for way in ("1t", "threads", "torch"))
    assert abs(result["per_call_1b_put_vs_raw"] - result["per_call_1b_put_ms"] / raw_put) < 0.02
    assert "per_call_7b_put_ms" not in result


def test_only_the_chosen_command_is_imported() -> None:
    from kvtier.cli import _chosen

    assert _chosen(["--config", "x.toml", "--set", "a.b=1", "bench", "disk", "--json"]) == ["bench", "disk"]
    assert _chosen(["--log-level", "DEBUG", "serve", "--layout", "x"]) == ["serve"]
    assert _chosen(["--help"]) == []
