"""``make gpu-check``'s script on the CPU: arguments, sections, failures recorded, one JSON file always."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.bench import gpu_check
from kvtier.bench.gpu_check import Completed, gpu_test_files, last_json_object, main, parse_args


class FakeRunner:
    """Answers each subprocess by the module or tool it runs; records the commands."""

    def __init__(self, answers: dict[str, Completed]) -> None:
        self.answers = answers
        self.commands: list[list[str]] = []

    def __call__(self, command: Sequence[str], timeout_s: float) -> Completed:
        self.commands.append(list(command))
        for word, answer in self.answers.items():
            if word in command:
                return answer
        raise AssertionError(f"unexpected command {command}")


WORKER = {"benchmark": "vllm_worker", "load_gbps": 40.0, "save_gbps": 41.0}


def _summary(tmp_path: Path, runner: FakeRunner, *extra: str) -> tuple[int, dict[str, Any]]:
    status = main(["--out", str(tmp_path), "--device", "cpu", "--store-mib", "8", "--cache-blocks", "32",
                   "--repeats", "1", *extra], runner=runner)
    return status, json.loads((tmp_path / "gpu-check.json").read_text())


def test_every_section_lands_in_one_summary(tmp_path: Path) -> None:
    runner = FakeRunner({
        "pytest": Completed(0, "....\n4 passed, 2 skipped in 3.1s\n", ""),
        "kvtier_connectors.vllm.bench_worker": Completed(0, "warming up\n" + json.dumps(WORKER) + "\n", ""),
        "ttft": Completed(2, "", "kvtier bench ttft: error: unrecognized arguments: --device cuda"),
    })
    status, summary = _summary(tmp_path, runner)
    assert status == 0 and summary["ok"] is True
    assert summary["pytest_gpu"]["passed"] == 4 and summary["pytest_gpu"]["skipped"] == 2
    assert "tests/test_native.py" in summary["pytest_gpu"]["files"]
    assert summary["vllm_worker"] == WORKER
    assert summary["ttft"]["error"] == "exit status 2" and "unrecognized" in summary["ttft"]["stderr_tail"]
    store = summary["store"]
    assert store["get_identical"] is True and {"put_vs_raw", "get_vs_raw", "restore8_vs_link"} <= set(store)
    gather = summary["gather"]
    assert {"gather_vs_contiguous", "slots_gather_vs_contiguous", "slots_scatter_vs_contiguous"} <= set(gather)
    assert summary["targets"]["store_put_vs_raw"]["value"] == store["put_vs_raw"]
    assert summary["environment"]["torch"] == torch.__version__
    ttft = next(command for command in runner.commands if "ttft" in command)
    assert ttft[ttft.index("--prompt-tokens") + 1] == "2048,8192,32768" and "bfloat16" in ttft


def test_failures_are_recorded_and_fail_the_check(tmp_path: Path) -> None:
    runner = FakeRunner({
        "pytest": Completed(1, "F.\n1 failed, 1 passed in 2.0s\n", "trace"),
        "kvtier_connectors.vllm.bench_worker": Completed(None, "partial", ""),
        "ttft": Completed(0, "no json here\n", ""),
    })
    status, summary = _summary(tmp_path, runner, "--skip", "store", "gather")
    assert status == 1 and summary["ok"] is False
    assert summary["pytest_gpu"]["ok"] is False and summary["pytest_gpu"]["failed"] == 1
    assert summary["vllm_worker"]["error"] == "timed out" and summary["vllm_worker"]["returncode"] is None
    assert summary["ttft"]["error"] == "no JSON object in its output"
    assert summary["store"] == {"skipped": True} and summary["targets"]["store_get_vs_raw"]["met"] is None


def test_a_benchmark_that_raises_is_an_error_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.bench import device

    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("no memory")

    monkeypatch.setattr(device, "run_device_store_bench", broken)
    runner = FakeRunner({"pytest": Completed(0, "1 passed in 1s\n", "")})
    status, summary = _summary(tmp_path, runner, "--skip", "gather", "vllm_worker", "ttft")
    assert status == 1 and summary["store"] == {"error": "RuntimeError: no memory"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the summary of a machine without CUDA")
def test_without_cuda_the_device_sections_say_so(tmp_path: Path) -> None:
    runner = FakeRunner({"pytest": Completed(0, "9 skipped in 1s\n", "")})
    status = main(["--out", str(tmp_path), "--skip", "gather"], runner=runner)
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert status == 1 and summary["store"] == {"error": "no CUDA device"}
    assert summary["vllm_worker"] == {"error": "no CUDA device"} and summary["pytest_gpu"]["ok"] is False


def test_arguments_and_helpers() -> None:
    args = parse_args([])
    assert args.out == Path("out") and args.device == "cuda" and args.skip == []
    with pytest.raises(SystemExit):
        parse_args(["--skip", "nonsense"])
    assert last_json_object('x\n{"a": 1}\n{broken\n') == {"a": 1}
    assert last_json_object("[1, 2]\n") is None
    assert all(path.startswith("tests/") for path in gpu_test_files(gpu_check.REPO_ROOT / "tests"))
