"""``kvtier demo`` and ``kvtier bench ttft`` at tiny sizes: they run, restore from both tiers, report identity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kvtier import StoreConfig
from kvtier_connectors.transformers import bench_ttft, demo, random_model

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_demo_restores_from_host_and_disk_with_identical_logits(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL", TINY)
    args = parse(demo, ["--conversations", "3", "--turns", "3", "--system-tokens", "64", "--block-tokens", "8",
                        "--host-blocks", "24", "--data-dir", str(tmp_path)])
    assert demo.run(args, StoreConfig()) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 9 and all(line.endswith("yes") for line in rows)
    summary = out.splitlines()[-1]
    assert summary.startswith("summary: 9 requests") and "identical in 9/9 requests" in summary
    assert "from disk 0;" not in summary and "from host 0," not in summary


def test_demo_parses_without_arguments() -> None:
    args = parse(demo, [])
    assert args.model is None and args.attn == "kvtier_exact" and args.data_dir is None


def test_bench_ttft_reports_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(bench_ttft, ["--json", "--prompt-tokens", "96", "--block-tokens", "16", "--hidden", "64",
                              "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                              "--vocab", "512"])
    assert bench_ttft.run(args, StoreConfig()) == 0
    record = json.loads(capsys.readouterr().out)
    for field in ("model", "prompt_tokens", "recompute_s", "restore_host_s", "restore_disk_s", "kv_bytes",
                  "raw_disk_read_gbps", "logits_identical"):
        assert field in record
    assert record["logits_identical"] is True and record["restored_tokens"] == 80
    assert record["disk_tiers"] == ["disk"] and record["raw_disk_read_gbps"] > 0


def test_demo_runs_on_a_local_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    random_model("llama", seed=3).save_pretrained(tmp_path / "model")
    args = parse(demo, ["--model", str(tmp_path / "model"), "--conversations", "2", "--turns", "2",
                        "--system-tokens", "48", "--block-tokens", "8", "--no-disk"])
    assert demo.run(args, StoreConfig()) == 0
    assert "identical in 4/4 requests" in capsys.readouterr().out.splitlines()[-1]
