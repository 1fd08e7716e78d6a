"""``make gpu-check``: kvtier's GPU tests and benchmarks on one CUDA machine, written as one JSON summary.

Sections (each a key of the summary; docs/gpu-check.md lists their fields):

- ``pytest_gpu``: ``pytest -m gpu`` over the test files that hold ``gpu`` tests (a subprocess; its counts
  read from the JUnit XML report it writes, not from its console output);
- ``store``: ``Store.put`` / ``Store.get`` with device tensors vs raw pinned copies (``kvtier.bench.device``);
- ``gather``: paged gather/scatter, contiguous and in place into arena slots, vs a contiguous copy;
- ``decode_during_save``: a decode-shaped step alone and during a save loop (``kvtier.bench.decode``);
- ``vllm_worker``: ``python -m kvtier_connectors.vllm.bench_worker --device cuda --json`` (a subprocess);
- ``ttft``: ``kvtier bench ttft`` at 2k, 8k and 32k prompt tokens, bf16, on the device (a subprocess).
A subprocess's JSON is its whole standard output parsed as one document (an indented document is fine);
failing that, the last line that parses as a JSON object.

Promises:
- One file, ``<out>/gpu-check.json``, is always written, whatever fails: a section that raised, exited
  non-zero, timed out or printed no JSON holds ``{"error": ..., ...}`` instead of figures, and the others
  still run. It is rewritten (atomically) after every section, with ``"complete": false`` until the last
  one ran, so a check killed at a device's time limit still leaves the sections it finished. ``targets``
  compares the figures found with the issue's targets (``null`` where absent).
- Nothing is installed or downloaded; modules kvtier needs that are missing are listed in ``environment``.
- The exit status is 0 when the gpu tests passed and the in-process benchmarks ran, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("pytest_gpu", "store", "gather", "decode_during_save", "vllm_worker", "ttft")
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


def json_document(text: str) -> dict[str, Any] | None:
    """The last JSON object of ``text`` that starts at the start of a line, parsed whole (indented or not).

    ``json.dumps(indent=...)`` starts only the outermost object at column 0, so a document printed after
    warnings or progress lines is found whole; a broken tail is skipped.
    """
    decoder = json.JSONDecoder()
    starts = [0] + [index + 1 for index, char in enumerate(text) if char == "\n"]
    for start in reversed(starts):
        if text.startswith("{", start):
            try:
                found, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
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
    parsed = json_document(completed.stdout)
    if parsed is None:
        return {**failure(completed, command), "error": "no JSON object in its output"}
    return parsed


def gpu_test_files(tests_dir: Path) -> list[str]:
    """The test files that mark a test ``gpu`` (collecting only those needs none of the disk tier's modules)."""
    def shown(path: Path) -> str:
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)

    return sorted(shown(path) for path in tests_dir.resolve().rglob("test_*.py")
                  if "mark.gpu" in path.read_text(errors="replace"))


def junit_counts(path: Path) -> dict[str, int]:
    """``passed``, ``failed``, ``errors``, ``skipped`` of a pytest JUnit XML report (``{}`` if unreadable)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {name: sum(int(suite.get(name, 0)) for suite in suites) for name in ("tests", "failures", "errors",
                                                                                 "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def pytest_section(runner: Runner, timeout_s: float, tests_dir: Path) -> dict[str, Any]:
    """``pytest -m gpu`` over ``tests_dir``'s gpu test files; ``ok`` when it exited 0 and some test passed."""
    files = gpu_test_files(tests_dir)
    with tempfile.TemporaryDirectory(prefix="kvtier-gpu-check-") as scratch:
        report = Path(scratch) / "junit.xml"
        # pyproject's addopts already say -q: the counts come from the report, whatever the verbosity.
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
                   f"--junitxml={report}", *files]
        started = time.perf_counter()
        completed = runner(command, timeout_s)
        counts = junit_counts(report)
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


def _worst(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return min(numbers) if numbers else None


def _ttft(summary: dict[str, Any], tokens: int, field: str, source: str = "host") -> float | None:
    """``field`` of the ``ttft`` record of ``source`` whose prompt is the closest to ``tokens`` (within 2x)."""
    records = [r for r in summary.get("ttft", {}).get("records", []) if isinstance(r, dict)
               and r.get("source") == source and isinstance(r.get("prompt_tokens"), int)
               and tokens / 2 <= r["prompt_tokens"] <= tokens * 2]
    if not records:
        return None
    return _ratio(min(records, key=lambda r: abs(r["prompt_tokens"] - tokens)), field)


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """Each target of issue 20 the summary has a figure for: the figure, the bound and whether it is met."""
    store, gather = summary.get("store", {}), summary.get("gather", {})
    worker = [r for r in summary.get("vllm_worker", {}).get("results", []) if isinstance(r, dict)]
    checks = {
        "store_put_vs_raw": (_ratio(store, "put_vs_raw"), ">=", 0.9),
        "store_get_vs_raw": (_ratio(store, "get_vs_raw"), ">=", 0.9),
        "restore8_vs_link": (_ratio(store, "restore8_vs_link"), "<=", 1.5),
        "slots_gather_vs_contiguous": (_ratio(gather, "slots_gather_vs_contiguous"), ">=", 0.9),
        "slots_scatter_vs_contiguous": (_ratio(gather, "slots_scatter_vs_contiguous"), ">=", 0.9),
        "vllm_worker_save_vs_raw": (_worst([r.get("save_ratio") for r in worker]), ">=", 0.8),
        "vllm_worker_load_vs_raw": (_worst([r.get("load_ratio") for r in worker]), ">=", 0.8),
        "transformers_restore_vs_h2d": (_ttft(summary, 8192, "restore_vs_raw"), ">=", 0.8),
        "ttft_speedup_8k": (_ttft(summary, 8192, "speedup"), ">=", 2.0),
        "ttft_speedup_32k": (_ttft(summary, 32768, "speedup"), ">=", 5.0),
        "decode_slowdown_during_save": (_ratio(summary.get("decode_during_save", {}), "slowdown"), "<=", 1.1),
    }
    result: dict[str, Any] = {}
    for name, (value, op, bound) in checks.items():
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        result[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return result


def run_check(args: argparse.Namespace, runner: Runner = run_subprocess,
              on_section: Callable[[dict[str, Any]], object] = lambda summary: None) -> dict[str, Any]:
    """Every section in turn; ``on_section`` sees the summary so far after each one."""
    started = time.perf_counter()
    summary: dict[str, Any] = {"benchmark": "gpu-check", "unix_time": int(time.time()), "device_arg": args.device,
                               "complete": False, "environment": environment()}
    on_section(summary)
    chosen = [name for name in SECTIONS if name not in args.skip]
    device_ok = args.device != "cuda" or torch.cuda.is_available()
    for name in SECTIONS:
        if name not in chosen:
            summary[name] = {"skipped": True}
        elif not device_ok and name != "pytest_gpu":
            summary[name] = {"error": "no CUDA device"}
        elif name == "pytest_gpu":
            summary[name] = pytest_section(runner, 2 * args.timeout_s, args.tests)
        elif name == "store":
            from kvtier.bench.device import run_device_store_bench

            summary[name] = in_process(lambda: run_device_store_bench(
                args.device, total_bytes=args.store_mib * 1024 * 1024, repeats=args.repeats))
        elif name == "gather":
            from kvtier.bench.gather import run_gather_bench

            summary[name] = in_process(lambda: run_gather_bench(
                device=args.device, cache_blocks=args.cache_blocks, gather_blocks=args.cache_blocks // 4,
                repeats=args.repeats))
        elif name == "decode_during_save":
            from kvtier.bench.decode import run_decode_during_save

            summary[name] = in_process(lambda: run_decode_during_save(
                args.device, hidden=args.decode_hidden, layers=args.decode_layers, steps=args.decode_steps,
                save_blocks=args.save_blocks))
        elif name == "vllm_worker":
            summary[name] = json_section(runner, [sys.executable, "-m", "kvtier_connectors.vllm.bench_worker",
                                                  "--device", args.device, "--json",
                                                  *shlex.split(args.worker_args)], args.timeout_s)
        else:
            summary[name] = json_section(runner, [
                sys.executable, "-m", "kvtier.cli", "bench", "ttft", "--device", args.device, "--dtype", "bfloat16",
                "--prompt-tokens", args.prompt_tokens, "--json", *shlex.split(args.ttft_args)], args.timeout_s)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        on_section(summary)
    summary["targets"] = targets(summary)
    in_process_ok = all("error" not in summary[name] for name in ("store", "gather", "decode_during_save")
                        if name in chosen)
    tests_ok = "pytest_gpu" not in chosen or bool(summary["pytest_gpu"].get("ok"))
    summary["ok"] = device_ok and in_process_ok and tests_ok
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["complete"] = True
    return summary


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu-check.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    partial.replace(path)
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
    parser.add_argument("--tests", type=Path, default=REPO_ROOT / "tests", help="folder of the gpu test files")
    parser.add_argument("--decode-hidden", type=int, default=2048, help="hidden size of the decode stand-in")
    parser.add_argument("--decode-layers", type=int, default=16, help="layers of the decode stand-in")
    parser.add_argument("--decode-steps", type=int, default=50, help="timed decode steps, alone and during saves")
    parser.add_argument("--save-blocks", type=int, default=64, help="2 MiB blocks per put of the save loop")
    parser.add_argument("--ttft-args", default="", help="more arguments of kvtier bench ttft (one string)")
    parser.add_argument("--worker-args", default="", help="more arguments of the vLLM worker bench (one string)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    args = parse_args(argv)
    summary = run_check(args, runner, on_section=lambda so_far: write_summary(so_far, args.out))
    path = write_summary(summary, args.out)
    print(json.dumps({"summary": str(path), "ok": summary["ok"], "seconds": summary["seconds"]}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
