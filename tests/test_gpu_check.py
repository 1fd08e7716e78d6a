"""``make gpu-check``'s script on the CPU: the real commands of every section that runs there, and failures
recorded (through a fake runner, which only the failure cases use), one JSON file always."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.bench import gpu_check
from kvtier.bench.gpu_check import Completed, gpu_test_files, json_document, junit_counts, main, parse_args


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
SMALL_DECODE = ["--decode-hidden", "64", "--decode-layers", "2", "--decode-steps", "3", "--save-blocks", "2"]
TINY_MODEL = ("--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 256 --block-tokens 16 "
              "--repeats 1")


def _summary(tmp_path: Path, runner: gpu_check.Runner, *extra: str) -> tuple[int, dict[str, Any]]:
    status = main(["--out", str(tmp_path), "--device", "cpu", "--store-mib", "8", "--cache-blocks", "32",
                   "--repeats", "1", *SMALL_DECODE, *extra], runner=runner)
    return status, json.loads((tmp_path / "gpu-check.json").read_text())


def test_failures_are_recorded_and_fail_the_check(tmp_path: Path) -> None:
    runner = FakeRunner({
        "pytest": Completed(1, "F.\n", "trace"),
        "kvtier_connectors.vllm.bench_worker": Completed(None, "partial", ""),
        "ttft": Completed(0, "no json here\n", ""),
    })
    status, summary = _summary(tmp_path, runner, "--skip", "store", "gather", "decode_during_save")
    assert status == 1 and summary["ok"] is False
    assert summary["pytest_gpu"]["ok"] is False and summary["pytest_gpu"]["returncode"] == 1
    assert summary["vllm_worker"]["error"] == "timed out" and summary["vllm_worker"]["returncode"] is None
    assert summary["ttft"]["error"] == "no JSON object in its output"
    assert summary["store"] == {"skipped": True} and summary["targets"]["store_get_vs_raw"]["met"] is None


def test_a_benchmark_that_raises_is_an_error_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.bench import device

    def broken(*args: object, **kwargs: object) -> dict[str, object]:
        raise RuntimeError("no memory")

    monkeypatch.setattr(device, "run_device_store_bench", broken)
    runner = FakeRunner({"pytest": Completed(0, "1 passed in 1s\n", "")})
    status, summary = _summary(tmp_path, runner, "--skip", "gather", "decode_during_save", "vllm_worker", "ttft")
    assert status == 1 and summary["store"] == {"error": "RuntimeError: no memory"}


def test_a_check_killed_mid_way_leaves_the_sections_it_finished(tmp_path: Path) -> None:
    """A device lent for a few minutes kills a check at its limit: the summary on disk after each section
    holds every section finished so far, marked incomplete, and is never a torn file."""
    seen: list[dict[str, Any]] = []

    class Killed(Exception):
        pass

    def runner(command: Sequence[str], timeout_s: float) -> Completed:
        on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
        seen.append(on_disk)
        if "kvtier_connectors.vllm.bench_worker" in command:
            raise Killed
        return Completed(0, "1 passed in 1s\n", "")

    with pytest.raises(Killed):
        _summary(tmp_path, runner, "--skip", "store", "gather", "decode_during_save")
    assert [on_disk["complete"] for on_disk in seen] == [False, False]
    assert "pytest_gpu" not in seen[0] and "pytest_gpu" in seen[1] and "vllm_worker" not in seen[1]
    left = json.loads((tmp_path / "gpu-check.json").read_text())
    assert left["complete"] is False and left["pytest_gpu"]["returncode"] == 0
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the summary of a machine without CUDA")
def test_without_cuda_the_device_sections_say_so(tmp_path: Path) -> None:
    runner = FakeRunner({"pytest": Completed(0, "9 skipped in 1s\n", "")})
    status = main(["--out", str(tmp_path), "--skip", "gather"], runner=runner)
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert status == 1 and summary["store"] == {"error": "no CUDA device"}
    assert summary["vllm_worker"] == {"error": "no CUDA device"} and summary["pytest_gpu"]["ok"] is False


def test_arguments_and_helpers(tmp_path: Path) -> None:
    args = parse_args([])
    assert args.out == Path("out") and args.device == "cuda" and args.skip == []
    with pytest.raises(SystemExit):
        parse_args(["--skip", "nonsense"])
    assert json_document('x\n{"a": 1}\n{broken\n') == {"a": 1}
    assert json_document("[1, 2]\n") is None
    indented = json.dumps({"benchmark": "ttft", "records": [{"speedup": 3.0}]}, indent=2)
    assert json_document("warming up\n" + indented + "\n") == json.loads(indented)
    assert all(path.startswith("tests/") for path in gpu_test_files(gpu_check.REPO_ROOT / "tests"))
    assert junit_counts(tmp_path / "absent.xml") == {}


def _gpu_tests(folder: Path) -> Path:
    folder.mkdir()
    (folder / "test_marked.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_runs() -> None:\n    assert True\n\n\n"
        "@pytest.mark.gpu\ndef test_skips() -> None:\n    pytest.skip('not here')\n\n\n"
        "def test_unmarked() -> None:\n    raise AssertionError('deselected by -m gpu')\n")
    return folder


def test_the_real_pytest_counts_passed_tests_under_pyprojects_quiet_flag(tmp_path: Path) -> None:
    """The real ``pytest -m gpu`` (pyproject's ``-q`` included): its passed tests count, the check passes."""
    status, summary = _summary(tmp_path, gpu_check.run_subprocess, "--tests", str(_gpu_tests(tmp_path / "t")),
                               "--skip", "store", "gather", "decode_during_save", "vllm_worker", "ttft")
    section = summary["pytest_gpu"]
    assert section["passed"] == 1 and section["skipped"] == 1 and section["failed"] == 0, section
    assert section["ok"] is True and status == 0 and summary["ok"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the repository's gpu tests skipping without CUDA")
def test_the_repositorys_gpu_tests_collect_and_skip_without_cuda(tmp_path: Path) -> None:
    status, summary = _summary(tmp_path, gpu_check.run_subprocess,
                               "--skip", "store", "gather", "decode_during_save", "vllm_worker", "ttft")
    section = summary["pytest_gpu"]
    assert section["returncode"] == 0 and section["errors"] == 0 and section["failed"] == 0, section
    assert section["skipped"] >= 10 and section["passed"] == 0 and section["ok"] is False and status == 1


def test_the_real_benchmark_commands_run_on_the_cpu(tmp_path: Path) -> None:
    """Every section but pytest, for real: in-process benchmarks and both subprocesses' JSON documents."""
    status, summary = _summary(tmp_path, gpu_check.run_subprocess, "--skip", "pytest_gpu",
                               "--prompt-tokens", "96", "--ttft-args", TINY_MODEL,
                               "--worker-args", "--chunks 2 --repeats 1", "--timeout-s", "600")
    assert status == 0 and summary["ok"] is True
    assert summary["store"]["get_identical"] is True and "slots_gather_vs_contiguous" in summary["gather"]
    decode = summary["decode_during_save"]
    assert decode["slowdown"] is not None and decode["save_gbps"] > 0, decode
    assert summary["vllm_worker"].get("bench") == "vllm_worker", summary["vllm_worker"]
    ttft = summary["ttft"]
    assert ttft.get("benchmark") == "ttft" and {r["source"] for r in ttft["records"]} == {"host", "disk"}, ttft
    targets = summary["targets"]
    assert targets["ttft_speedup_8k"]["value"] is None  # 96 tokens is no 8k figure
    assert targets["decode_slowdown_during_save"]["value"] == decode["slowdown"]
    assert targets["store_put_vs_raw"]["value"] == summary["store"]["put_vs_raw"]
