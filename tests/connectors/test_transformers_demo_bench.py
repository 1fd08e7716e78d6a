"""``kvtier demo`` and ``kvtier bench ttft`` at tiny sizes: they run, restore from both tiers, report the contract."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import ConfigError, StoreConfig
from kvtier.arena import HostArena
from kvtier_connectors.transformers import bench_ttft, demo, random_model
from kvtier_connectors.transformers.contract import RecordingStore

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_demo_restores_from_host_and_disk_and_the_contract_holds(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL", TINY)
    args = parse(demo, ["--conversations", "3", "--turns", "3", "--system-tokens", "64", "--block-tokens", "8",
                        "--host-blocks", "24", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert demo.run(args, StoreConfig()) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 9 and not any("VIOLATED" in line for line in rows)
    restores = sum(" equal " in line for line in rows)  # KV equal to the saved KV
    assert restores >= 5 and not any(" DIFFER " in line for line in rows)
    contract, final = out.splitlines()[-2:]
    assert f"in {restores}/{restores} restores" in contract and "top-1 agrees in 9/9" in contract
    assert contract.endswith("held")
    assert final.startswith("kvtier on cpu (float32): TTFT") and "x faster over 9 requests" in final
    assert "), 0 blocks from the host tier" not in final and " and 0 from the disk tier" not in final


def test_demo_fails_when_restored_kv_is_not_what_was_saved(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL", TINY)
    original = RecordingStore.acquire

    def corrupting_acquire(self: RecordingStore, keys: Any, timeout: float | None = None) -> Any:
        lease = original(self, keys, timeout)
        for slot in lease.slots[1:2]:
            self.store.slot_view(slot)[7] += 1.0  # one element of the second restored block
        return lease

    monkeypatch.setattr(RecordingStore, "acquire", corrupting_acquire)
    args = parse(demo, ["--conversations", "2", "--turns", "1", "--system-tokens", "64", "--block-tokens", "8",
                        "--no-disk", "--device", "cpu"])
    assert demo.run(args, StoreConfig()) == 1
    out = capsys.readouterr().out
    assert "DIFFER" in out and "CONTRACT VIOLATED" in out and out.splitlines()[-2].endswith("VIOLATED")


def test_demo_parses_without_arguments() -> None:
    args = parse(demo, [])
    assert args.model is None and args.attn == "sdpa" and args.data_dir is None
    assert args.device == "auto" and args.dtype == "auto"
    assert demo.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert demo.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_demo_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        demo.resolve_device("cuda")


def test_demo_checks_kvtier_exact_on_this_machine_before_claiming_it(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL", TINY)
    monkeypatch.setattr(demo, "verify", lambda model, seed: False)
    args = parse(demo, ["--attn", "kvtier_exact", "--conversations", "1", "--turns", "2", "--system-tokens", "48",
                        "--block-tokens", "8", "--no-disk", "--device", "cpu"])
    assert demo.run(args, StoreConfig()) == 0  # the contract, not bit-exactness, decides
    assert "kvtier_exact: NOT bit-exact on this machine" in capsys.readouterr().out


BENCH_TINY = ["--block-tokens", "16", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
              "--intermediate", "128", "--vocab", "512", "--repeats", "2", "--device", "cpu"]


def test_bench_ttft_reports_each_part_per_length_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(bench_ttft, ["--json", "--prompt-tokens", "96,128", *BENCH_TINY])
    assert bench_ttft.run(args, StoreConfig()) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["benchmark"], document["device"], document["dtype"]) == ("ttft", "cpu", "float32")
    records = document["records"]
    assert [(r["prompt_tokens"], r["source"]) for r in records] == [(96, "host"), (96, "disk"), (128, "host"),
                                                                   (128, "disk")]
    for record in records:
        for field in ("recompute_s", "ttft_kvtier_s", "restore_s", "tail_forward_s", "save_s", "restore_gbps",
                      "raw_gbps", "speedup", "max_abs_logit_diff", "tolerance"):
            assert record[field] >= 0, field
        assert record["ttft_kvtier_s"] > 0 and record["recompute_s"] > 0
        assert record["kv_identical"] is True and record["top1_agree"] is True and record["contract_held"] is True
        assert record["tiers"] == [record["source"]]
        assert record["restored_tokens"] == record["prompt_tokens"] - 16
        assert record["kv_bytes"] == record["restored_tokens"] * 2 * 2 * 2 * 16 * 4  # layers, K/V, heads, dim


def test_bench_ttft_times_each_store_once_its_arena_is_prepared(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A store opened right before a restore would charge it the arena's first touch, which the raw baselines
    do not pay: every store the bench times (the host one and each reopened one) is prefaulted first, and every
    connector restores into the same reused memory (fresh memory would charge each restore its first touch)."""
    prepared: list[bool] = []
    buffers: set[int] = set()

    class Recording(bench_ttft.TransformersConnector):
        def prefill(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
            arena = self.store.arena  # type: ignore[attr-defined]
            prepared.append(arena.prefaulted_bytes == arena.total_bytes)
            buffers.add(id(self.restore_buffers))
            return super().prefill(input_ids, **kwargs)

    prefault = HostArena._prefault_chunks

    def slow_prefault(arena: HostArena) -> None:
        time.sleep(0.5)  # a large arena on a VM: the restore would otherwise come first
        prefault(arena)

    monkeypatch.setattr(HostArena, "_prefault_chunks", slow_prefault)
    monkeypatch.setattr(bench_ttft, "TransformersConnector", Recording)
    args = parse(bench_ttft, ["--json", "--prompt-tokens", "96", *BENCH_TINY])
    assert bench_ttft.run(args, StoreConfig()) == 0
    capsys.readouterr()
    assert len(prepared) == 4 and all(prepared), prepared  # 2 repeats from each tier
    assert len(buffers) == 1


def test_bench_ttft_pins_the_arena_for_the_model_device_before_timing_on_cuda() -> None:
    calls: list[object] = []

    class Arena:
        def wait_prepared(self, timeout: float) -> bool:
            calls.append(("prefault", timeout))
            return True

        def wait_pinned(self, timeout: float) -> bool:
            calls.append(("pinned", timeout))
            return True

    class FakeStore:
        arena = Arena()

        def pin_for(self, device: torch.device) -> None:
            calls.append(("pin_for", device))

    store: Any = FakeStore()
    limit = bench_ttft.PREPARE_TIMEOUT_S
    assert bench_ttft._prepared(store, torch.device("cpu")) is store
    assert calls == [("prefault", limit)]
    calls.clear()
    bench_ttft._prepared(store, torch.device("cuda", 1))
    assert calls == [("prefault", limit), ("pin_for", torch.device("cuda", 1)), ("pinned", limit)]


def test_bench_ttft_prints_a_table_and_takes_bfloat16(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(bench_ttft, ["--prompt-tokens", "64", "--dtype", "bfloat16", *BENCH_TINY])
    assert bench_ttft.run(args, StoreConfig()) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ttft on cpu (bfloat16), medians of 2")
    assert len(out) == 4 and all(" equal " in line for line in out[2:])


@pytest.mark.parametrize("text", ["", "0", "12,x", "-5"])
def test_bench_ttft_refuses_bad_prompt_lengths(text: str) -> None:
    with pytest.raises(SystemExit):
        parse(bench_ttft, ["--prompt-tokens", text])
    assert bench_ttft.prompt_lengths("2048, 8192") == [2048, 8192]


def test_demo_runs_on_a_local_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    random_model("llama", seed=3).save_pretrained(tmp_path / "model")
    args = parse(demo, ["--model", str(tmp_path / "model"), "--conversations", "2", "--turns", "2",
                        "--system-tokens", "48", "--block-tokens", "8", "--no-disk"])
    assert demo.run(args, StoreConfig()) == 0
    assert "top-1 agrees in 4/4" in capsys.readouterr().out.splitlines()[-2]


@pytest.mark.gpu
def test_demo_and_bench_run_on_cuda_in_bfloat16(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "DEMO_MODEL_CUDA", TINY)
    args = parse(demo, ["--conversations", "2", "--turns", "2", "--system-tokens", "64", "--block-tokens", "8",
                        "--no-disk", "--device", "cuda"])
    assert demo.run(args, StoreConfig()) == 0
    final = capsys.readouterr().out.splitlines()[-1]
    assert final.startswith("kvtier on cuda (bfloat16): TTFT")
    args = parse(bench_ttft, ["--json", "--prompt-tokens", "96", *BENCH_TINY[:-2], "--device", "cuda"])
    assert bench_ttft.run(args, StoreConfig()) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["device"], document["dtype"]) == ("cuda", "bfloat16")
    assert all(record["kv_identical"] and record["contract_held"] for record in document["records"])
