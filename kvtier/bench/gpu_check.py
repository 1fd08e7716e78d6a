"""``make gpu-check``: kvtier's GPU tests and benchmarks on one CUDA machine, written as one JSON summary.

Sections (each a key of the summary; docs/gpu-check.md lists their fields):

- ``pytest_gpu``: ``pytest -m gpu`` over the test files that hold ``gpu`` tests (a subprocess);
- ``store``: ``Store.put`` / ``Store.get`` with device tensors vs raw pinned copies (``kvtier.bench.device``);
- ``gather``: paged gather/scatter, contiguous and in place into arena slots, vs a contiguous copy;
- ``vllm_worker``: ``python -m kvtier_connectors.vllm.bench_worker --device cuda --json`` (a subprocess);
- ``ttft``: ``kvtier bench ttft`` at 2k, 8k and 32k prompt tokens, bf16, on the device (a subprocess).

Promises:
- One file, ``<out>/gpu-check.json``, is always written, whatever fails: a section that raised, exited
  non-zero, timed out or printed no JSON holds ``{"error": ..., ...}`` instead of figures, and the others
  still run. ``targets`` compares the figures found with the issue's targets (``null`` where absent).
- Nothing is installed or downloaded; modules kvtier needs that are missing are listed in ``environment``.
- The exit status is 0 when the gpu tests passed and the in-process benchmarks ran, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("pytest_gpu", "store", "gather", "vllm_worker", "ttft")
_OPTIONAL_MODULES = ("blake3", "xxhash", "msgpack", "lmdb", "zstandard", "platformdirs", "cupy", "transformers",
                     "vllm")
_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Completed:
    """What a subprocess left: its exit status (``None``: killed at its timeout), stdout and stderr."""

    returncode: int | None
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], float], Completed]


def run_subprocess(command: Sequence[str], timeout_s: float) -> Completed:
    """Run ``command`` from the repository root; a timeout is a ``returncode`` of ``None``."""
    try:
        done = subprocess.run(list(command), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        def text(value: str | bytes | None) -> str:
            return value.decode(errors="replace") if isinstance(value, bytes) else value or ""
        return Completed(None, text(exc.stdout), text(exc.stderr))
    return Completed(done.returncode, done.stdout, done.stderr)


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object, or ``None``."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                return parsed
    return None


def failure(completed: Completed, command: Sequence[str]) -> dict[str, Any]:
    reason = "timed out" if completed.returncode is None else f"exit status {completed.returncode}"
    return {"error": reason, "command": " ".join(command), "returncode": completed.returncode,
            "stdout_tail": completed.stdout[-_TAIL_CHARS:], "stderr_tail": completed.stderr[-_TAIL_CHARS:]}


def json_section(runner: Runner, command: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """A subprocess that prints one JSON object: that object, or what went wrong."""
    completed = runner(command, timeout_s)
    if completed.returncode != 0:
        return failure(completed, command)
    parsed = last_json_object(completed.stdout)
    if parsed is None:
        return {**failure(completed, command), "error": "no JSON object in its output"}
    return parsed


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test files that mark a test ``gpu`` (collecting only those needs none of the disk tier's modules)."""
    return sorted(str(path.relative_to(REPO_ROOT)) for path in tests_dir.rglob("test_*.py")
                  if "mark.gpu" in path.read_text(errors="replace"))


def pytest_section(runner: Runner, timeout_s: float) -> dict[str, Any]:
    files = gpu_test_files(REPO_ROOT / "tests")
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs", *files]
    started = time.perf_counter()
    completed = runner(command, timeout_s)
    counts = {word: int(number) for number, word in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", completed.stdout)}
    result: dict[str, Any] = {"files": files, "returncode": completed.returncode,
                              "seconds": round(time.perf_counter() - started, 1), **counts}
    result["ok"] = completed.returncode == 0 and counts.get("passed", 0) > 0
    if not result["ok"]:
        result.update({k: v for k, v in failure(completed, command).items() if k not in result})
    return result


def in_process(run: Callable[[], dict[str, object]]) -> dict[str, Any]:
    try:
        return dict(run())
    except Exception as exc:  # recorded in the summary: one failing benchmark must not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"}


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "missing_modules": [name for name in _OPTIONAL_MODULES if importlib.util.find_spec(name) is None],
    }
    try:
        from kvtier.native import load_copy_kernel, load_kernels

        info["kernels_available"] = cuda and load_kernels() is not None and load_copy_kernel() is not None
    except Exception as exc:  # kvtier itself may not import when a dependency is missing
        info["kernels_available"] = False
        info["kvtier_import_error"] = f"{type(exc).__name__}: {exc}"
    if "cupy" not in info["missing_modules"]:
        try:
            info["cupy"] = importlib.import_module("cupy").__version__
        except Exception as exc:
            info["cupy"] = f"unusable: {type(exc).__name__}: {exc}"
    return info


def _ratio(section: dict[str, Any], name: str) -> float | None:
    value = section.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Each target of issue 10 the summary has a figure for: the figure, the bound and whether it is met."""
    store, gather = summary.get("store", {}), summary.get("gather", {})
    checks = {
        "store_put_vs_raw": (_ratio(store, "put_vs_raw"), ">=", 0.9),
        "store_get_vs_raw": (_ratio(store, "get_vs_raw"), ">=", 0.9),
        "restore8_vs_link": (_ratio(store, "restore8_vs_link"), "<=", 1.5),
        "slots_gather_vs_contiguous": (_ratio(gather, "slots_gather_vs_contiguous"), ">=", 0.9),
        "slots_scatter_vs_contiguous": (_ratio(gather, "slots_scatter_vs_contiguous"), ">=", 0.9),
    }
    result: dict[str, Any] = {}
    for name, (value, op, bound) in checks.items():
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        result[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return result


def run_check(args: argparse.Namespace, runner: Runner = run_subprocess) -> dict[str, Any]:
    started = time.perf_counter()
    summary: dict[str, Any] = {"benchmark": "gpu-check", "unix_time": int(time.time()), "device_arg": args.device,
                               "environment": environment()}
    chosen = [name for name in SECTIONS if name not in args.skip]
    device_ok = args.device != "cuda" or torch.cuda.is_available()
    for name in SECTIONS:
        if name not in chosen:
            summary[name] = {"skipped": True}
        elif not device_ok and name != "pytest_gpu":
            summary[name] = {"error": "no CUDA device"}
        elif name == "pytest_gpu":
            summary[name] = pytest_section(runner, 2 * args.timeout_s)
        elif name == "store":
            from kvtier.bench.device import run_device_store_bench

            summary[name] = in_process(lambda: run_device_store_bench(
                args.device, total_bytes=args.store_mib * 1024 * 1024, repeats=args.repeats))
        elif name == "gather":
            from kvtier.bench.gather import run_gather_bench

            summary[name] = in_process(lambda: run_gather_bench(
                device=args.device, cache_blocks=args.cache_blocks, gather_blocks=args.cache_blocks // 4,
                repeats=args.repeats))
        elif name == "vllm_worker":
            summary[name] = json_section(runner, [sys.executable, "-m", "kvtier_connectors.vllm.bench_worker",
                                                  "--device", args.device, "--json"], args.timeout_s)
        else:
            summary[name] = json_section(runner, [
                sys.executable, "-m", "kvtier.cli", "bench", "ttft", "--device", args.device, "--dtype", "bfloat16",
                "--prompt-tokens", args.prompt_tokens, "--json"], args.timeout_s)
    summary["targets"] = targets(summary)
    in_process_ok = all("error" not in summary[name] for name in ("store", "gather") if name in chosen)
    tests_ok = "pytest_gpu" not in chosen or bool(summary["pytest_gpu"].get("ok"))
    summary["ok"] = device_ok and in_process_ok and tests_ok
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu-check.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvtier.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder of gpu-check.json (default: out)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the check itself")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections not to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store-mib", type=int, default=1024, help="MiB per store put/get repeat")
    parser.add_argument("--cache-blocks", type=int, default=512, help="paged cache blocks of the gather bench")
    parser.add_argument("--prompt-tokens", default="2048,8192,32768", help="TTFT prompt sizes")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="limit of each subprocess (pytest: twice)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    args = parse_args(argv)
    summary = run_check(args, runner)
    path = write_summary(summary, args.out)
    print(json.dumps({"summary": str(path), "ok": summary["ok"], "seconds": summary["seconds"]}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
