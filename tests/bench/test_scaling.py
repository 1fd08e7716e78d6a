"""``kvtier bench scaling`` on small sizes: every figure, aligned with its sweep, with growth verdicts."""

from __future__ import annotations

import json

import pytest

from kvtier.bench import scaling
from kvtier.cli import main


def test_scaling_reports_both_sweeps_per_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scaling", "--index-blocks", "100", "1000", "--prompt-tokens", "256", "512",
                 "--repeats", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    index, prompt = record["index"], record["prompt"]
    assert index["blocks"] == [100, 1000] and prompt["tokens"] == [256, 512]
    for name in ("fill_us_per_block", "lookup_us_per_block", "put_us_per_block", "get_us_per_block"):
        assert len(index[name]) == 2 and all(value > 0 for value in index[name]), name
    for name in ("key_derive_ms", "lookup_ms", "put_ms", "get_ms", "put_us_per_block", "get_us_per_block"):
        assert len(prompt[name]) == 2 and all(value > 0 for value in prompt[name]), name
    for sweep in (index, prompt):
        for verdict in sweep["growth"].values():
            assert verdict["growth"] > 0 and isinstance(verdict["constant_per_block"], bool)


def test_scaling_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse_namespace(index_blocks=[64], prompt_tokens=[64], repeats=1)
    assert scaling.run(args, scaling.StoreConfig()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["blocks", "stored"] and lines[1].split()[0] == "64"


def argparse_namespace(**fields: object) -> object:
    import argparse

    return argparse.Namespace(quick=False, json=False, **fields)
