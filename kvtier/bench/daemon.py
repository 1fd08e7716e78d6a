"""``kvtier bench daemon``: the daemon against the embedded store, in one run, with the same blocks.

Measures, for 1, 2 and 4 clients sharing one daemon: put and get throughput (GB/s, 1e9 bytes, all clients
together) and the latency of a 64-key lookup; and, in the same run, the embedded store's put and get
throughput with the same block size and batch, and a raw ``torch`` memcpy as the machine's baseline.
The one-client figures come from a client in the benchmark's own process, alternated with the embedded
store REPEATS times (medians), so that both see the same background load; 2 and 4 clients are processes.

Promises:
- Fixed seeds; every phase runs for a bounded time; every put and get is checked to succeed (a failed block
  aborts the run with an error instead of inflating a figure).
- Lookup latency is measured twice: closed loop (``lookup_p50_us`` / ``lookup_p99_us``: each client sends
  its next lookup as soon as the last returns, so with N clients a lookup queues behind the others) and
  paced (``paced_lookup_*``: each client once a millisecond).
- ``--json`` prints one JSON record on stdout (``clients``, ``daemon_put_gbps`` / ``daemon_get_gbps`` /
  ``lookup_p50_us`` / ``lookup_p99_us`` / ``paced_lookup_*`` aligned with ``clients``, ``embedded_put_gbps``,
  ``embedded_get_gbps``, ``memcpy_gbps``, the ratios and whether the targets were met); a one-line summary
  always goes to stderr.
- The daemon it starts is its own (a private socket, no disk, no metrics) and is stopped at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtier.config import StoreConfig, TransferConfig, parse_bytes
from kvtier.daemon.client import Client
from kvtier.errors import KvtierError
from kvtier.layout import KVLayout
from kvtier.store import Store

HELP = "benchmark the daemon against the embedded store (throughput, lookup latency)"
LOOKUP_KEYS = 64
# One client against the embedded store: alternated this many times, medians reported.
REPEATS = 3
# The paced phase: each client looks up once per interval (an engine scheduler's rhythm, not a flood).
LOOKUP_INTERVAL_S = 0.001
SEED = 1234


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the JSON record on stdout")
    parser.add_argument("--clients", default="1,2,4", help="client process counts (default 1,2,4)")
    parser.add_argument("--block-bytes", default="1MiB", help="bytes per block (default 1MiB)")
    parser.add_argument("--batch", type=int, default=32, help="blocks per put or get (default 32)")
    parser.add_argument("--pool", default="512MiB", help="host pool of the daemon and the embedded store")
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each timed phase")


def layout_for(block_bytes: int) -> KVLayout:
    """A float16 layout of 16 tokens x 8 heads x 64 dims per layer whose blocks are ``block_bytes`` long."""
    layer_bytes = 2 * 8 * 16 * 64 * 2
    if block_bytes % layer_bytes:
        raise ValueError(f"--block-bytes must be a multiple of {layer_bytes}")
    return KVLayout(num_layers=block_bytes // layer_bytes, num_kv_heads=8, head_dim=64, dtype="float16",
                    block_tokens=16)


def make_keys(tag: str, count: int) -> list[bytes]:
    return [hashlib.sha256(f"{SEED}-{tag}-{i}".encode()).digest()[:16] for i in range(count)]


# -- one timed workload, run by the embedded store and by every client process ---------------------------

StoreLike = Store | Client


def _timed(seconds: float, step: Callable[[int], int]) -> tuple[int, float]:
    """Run ``step(round)`` (which returns bytes moved) until ``seconds`` passed; (bytes, elapsed)."""
    moved, rounds = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        moved += step(rounds)
        rounds += 1
    return moved, time.perf_counter() - start


def throughput(store: StoreLike, layout: KVLayout, tag: str, batch: int, working_blocks: int, seconds: float,
               sync: Callable[[], object], warm: bool = True) -> dict[str, Any]:
    """Puts of fresh keys, then gets of a resident working set of ``working_blocks``; bytes and seconds.

    With ``warm``, the caller's share of the pool (twice ``working_blocks``) is written once first, so that no
    timed copy pays for first-touch page faults of the arena. Returns the working set's keys too.
    """
    generator = torch.Generator().manual_seed(SEED)
    blocks = [torch.randn(layout.block_numel, generator=generator).to(torch.float16) for _ in range(batch)]
    out = [torch.empty(layout.block_numel, dtype=torch.float16) for _ in range(batch)]
    fresh = (hashlib.sha256(f"{SEED}-{tag}-fresh-{i}".encode()).digest()[:16] for i in itertools.count())

    def put(_: int) -> int:
        if not store.put([next(fresh) for _ in range(batch)], blocks).wait().ok:
            raise KvtierError("a put found no room")
        return batch * layout.block_bytes

    working = make_keys(f"{tag}-working", working_blocks)
    for round_ in range(-(-2 * working_blocks // batch) if warm else 0):
        put(round_)
    sync()
    put_bytes, put_s = _timed(seconds, put)
    for start in range(0, working_blocks, batch):
        chunk = working[start : start + batch]
        if not store.put(chunk, blocks[: len(chunk)]).wait().ok:
            raise KvtierError("the benchmark's working set did not fit in the pool")
    sync()

    def get(round_: int) -> int:
        start = round_ * batch % working_blocks
        chunk = working[start : start + batch]
        if not store.get(chunk, out[: len(chunk)]).wait().ok:
            raise KvtierError("a get of a resident block failed")
        return len(chunk) * layout.block_bytes

    get_bytes, get_s = _timed(seconds, get)
    return {"put_bytes": put_bytes, "put_s": put_s, "get_bytes": get_bytes, "get_s": get_s, "working": working}


def lookups(store: StoreLike, probe: list[bytes], seconds: float, sync: Callable[[], object]) -> dict[str, Any]:
    """Latencies (s) of lookups of ``probe`` (all resident): a closed loop, then one per LOOKUP_INTERVAL_S."""
    latencies: list[float] = []

    def lookup(_: int) -> int:
        start = time.perf_counter()
        found = store.lookup(probe, prefetch=False).num_blocks
        latencies.append(time.perf_counter() - start)
        if found != len(probe):
            raise KvtierError("a lookup missed resident blocks")
        return 0

    sync()
    _timed(seconds, lookup)
    closed_loop = latencies
    latencies = []
    next_at = time.perf_counter()

    def paced_lookup(round_: int) -> int:
        nonlocal next_at
        next_at += LOOKUP_INTERVAL_S
        lookup(round_)
        time.sleep(max(0.0, next_at - time.perf_counter()))
        return 0

    sync()
    _timed(seconds, paced_lookup)
    return {"lookups_s": closed_loop, "paced_lookups_s": latencies}


def workload(store: StoreLike, layout: KVLayout, tag: str, batch: int, working_blocks: int, seconds: float,
             sync: Callable[[], object]) -> dict[str, Any]:
    """``throughput`` then ``lookups`` of the first LOOKUP_KEYS keys of its working set."""
    moved = throughput(store, layout, tag, batch, working_blocks, seconds, sync)
    working = moved.pop("working")
    return {**moved, **lookups(store, working[:LOOKUP_KEYS], seconds, sync)}


def _client_process(address: str, layout: dict[str, Any], transfer: dict[str, Any], tag: str, batch: int,
                    working_blocks: int, seconds: float, barrier: multiprocessing.synchronize.Barrier,
                    results: Any) -> None:
    kv_layout = KVLayout.from_dict(layout)
    config = StoreConfig(transfer=TransferConfig(**transfer))
    try:
        with Client(kv_layout, config, address=address) as client:
            results.put(workload(client, kv_layout, tag, batch, working_blocks, seconds,
                                 lambda: barrier.wait(300)))
    except BaseException as exc:
        # Free the other clients from the barrier at once, and tell the parent why.
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


# -- the daemon and the runs ------------------------------------------------------------------------------


def _start_daemon(workdir: str, layout: KVLayout, pool_bytes: int) -> tuple[subprocess.Popen[bytes], str]:
    socket_path = os.path.join(workdir, "bench.sock")
    log_path = Path(workdir) / "daemon.log"
    fields = ",".join(f"{name}={value}" for name, value in layout.to_dict().items())
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "--set", "host.policy=lru", "serve",
                                 "--socket", socket_path, "--no-disk", "--metrics-port", "0", "--pool",
                                 str(pool_bytes), "--layout", fields],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "daemon ready" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise KvtierError(f"the daemon did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc, f"unix:{socket_path}"


def _run_clients(address: str, layout: KVLayout, transfer: TransferConfig, count: int, batch: int,
                 pool_blocks: int, seconds: float) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    # Half the pool holds the working sets, so the gets and lookups never miss.
    working = max(LOOKUP_KEYS, pool_blocks // 2 // count)
    procs = [context.Process(target=_client_process, args=(address, layout.to_dict(), dataclasses.asdict(transfer),
                                                           f"c{count}-{i}", batch, working, seconds, barrier,
                                                           results))
             for i in range(count)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=600) for _ in procs]
    errors = [outcome["error"] for outcome in outcomes if "error" in outcome]
    if errors:
        raise KvtierError(f"benchmark clients failed: {errors}")
    for proc in procs:
        proc.join(60)
        if proc.exitcode != 0:
            raise KvtierError(f"a benchmark client exited with status {proc.exitcode}")
    return outcomes


def _gbps(outcomes: list[dict[str, Any]], what: str) -> float:
    moved: int = sum(o[f"{what}_bytes"] for o in outcomes)
    elapsed: float = max(o[f"{what}_s"] for o in outcomes)
    return moved / elapsed / 1e9


def _percentile_us(latencies: list[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def _memcpy_gbps(nbytes: int, seconds: float) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    moved, elapsed = _timed(seconds, lambda _: dst.copy_(src).numel())
    return moved / elapsed / 1e9


def _alternate(store: Store, client: Client, layout: KVLayout, batch: int, pool_blocks: int,
               seconds: float) -> dict[str, Any]:
    """One client in this process against the embedded store, alternating REPEATS times so that both see
    the same background load; medians of the throughputs and of the per-repeat ratios."""
    working = pool_blocks // 2
    runs: dict[str, list[dict[str, Any]]] = {"embedded": [], "daemon": []}
    for repeat in range(REPEATS):
        for name, target in (("embedded", store), ("daemon", client)):
            runs[name].append(throughput(target, layout, f"{name}-{repeat}", batch, working, seconds,
                                         lambda: None, warm=repeat == 0))
    probe = runs["daemon"][-1]["working"][:LOOKUP_KEYS]
    embedded_probe = runs["embedded"][-1]["working"][:LOOKUP_KEYS]
    figures: dict[str, Any] = {"embedded": {
        "embedded_put_gbps": statistics.median(_gbps([run], "put") for run in runs["embedded"]),
        "embedded_get_gbps": statistics.median(_gbps([run], "get") for run in runs["embedded"]),
        "embedded_lookup_p50_us": _percentile_us(lookups(store, embedded_probe, seconds, lambda: None)["lookups_s"],
                                                 0.5),
    }}
    for what in ("put", "get"):
        ratios = [_gbps([daemon], what) / _gbps([embedded], what)
                  for daemon, embedded in zip(runs["daemon"], runs["embedded"], strict=True)]
        figures["embedded"][f"{what}_ratio_1_client"] = statistics.median(ratios)
        median_run = sorted(runs["daemon"], key=lambda run: _gbps([run], what))[REPEATS // 2]
        figures[f"{what}_bytes"], figures[f"{what}_s"] = median_run[f"{what}_bytes"], median_run[f"{what}_s"]
    return {**figures, **lookups(client, probe, seconds, lambda: None)}


def _add_client_figures(record: dict[str, Any], outcomes: list[dict[str, Any]]) -> None:
    latencies = [latency for outcome in outcomes for latency in outcome["lookups_s"]]
    paced = [latency for outcome in outcomes for latency in outcome["paced_lookups_s"]]
    record["daemon_put_gbps"].append(_gbps(outcomes, "put"))
    record["daemon_get_gbps"].append(_gbps(outcomes, "get"))
    record["lookup_p50_us"].append(_percentile_us(latencies, 0.5))
    record["lookup_p99_us"].append(_percentile_us(latencies, 0.99))
    record["paced_lookup_p50_us"].append(_percentile_us(paced, 0.5))
    record["paced_lookup_p99_us"].append(_percentile_us(paced, 0.99))


def measure(clients: list[int], block_bytes: int, batch: int, pool_bytes: int, seconds: float,
            transfer: TransferConfig) -> dict[str, Any]:
    """The JSON record; see the module docstring."""
    layout = layout_for(block_bytes)
    pool_blocks = pool_bytes // block_bytes
    if pool_blocks < 2 * max(LOOKUP_KEYS, batch) * max(clients):
        raise KvtierError(f"--pool {pool_bytes} is too small for {max(clients)} clients of this batch")
    load_average = os.getloadavg()[0]  # other work on the machine skews every figure; the record says how much
    memcpy = _memcpy_gbps(batch * block_bytes, seconds)
    config = StoreConfig(transfer=transfer)
    # LRU in both stores: the working set, written last, then stays resident while it is read.
    config = dataclasses.replace(config, host=dataclasses.replace(config.host, capacity_bytes=pool_bytes,
                                                                  policy="lru"))
    record: dict[str, Any] = {
        "clients": clients, "block_bytes": block_bytes, "batch_blocks": batch, "pool_bytes": pool_bytes,
        "load_average": load_average, "memcpy_gbps": memcpy,
        "daemon_put_gbps": [], "daemon_get_gbps": [], "lookup_p50_us": [], "lookup_p99_us": [],
        "paced_lookup_p50_us": [], "paced_lookup_p99_us": [],
    }
    with tempfile.TemporaryDirectory(prefix="kvbench") as workdir:
        proc, address = _start_daemon(workdir, layout, pool_bytes)
        try:
            with Store(layout, config) as store, Client(layout, config, address=address) as client:
                one_client = _alternate(store, client, layout, batch, pool_blocks, seconds)
            record.update(one_client.pop("embedded"))
            for count in clients:
                outcomes = [one_client] if count == 1 else _run_clients(address, layout, transfer, count, batch,
                                                                        pool_blocks, seconds)
                _add_client_figures(record, outcomes)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if 1 in clients:
        record["throughput_target_met"] = min(record["put_ratio_1_client"], record["get_ratio_1_client"]) >= 0.8
    if 4 in clients:
        record["lookup_target_met"] = record["lookup_p99_us"][clients.index(4)] < 1000
        record["paced_lookup_target_met"] = record["paced_lookup_p99_us"][clients.index(4)] < 1000
    return record


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    clients = [int(count) for count in args.clients.split(",")]
    record = measure(clients, parse_bytes(args.block_bytes, "--block-bytes"), args.batch,
                     parse_bytes(args.pool, "--pool"), args.seconds, config.transfer)
    if args.json:
        print(json.dumps(record, indent=2))
    puts = "/".join(f"{gbps:.2f}" for gbps in record["daemon_put_gbps"])
    gets = "/".join(f"{gbps:.2f}" for gbps in record["daemon_get_gbps"])
    p99 = "/".join(f"{us:.0f}" for us in record["lookup_p99_us"])
    paced = "/".join(f"{us:.0f}" for us in record["paced_lookup_p99_us"])
    print(f"daemon put {puts} GB/s, get {gets} GB/s for {clients} clients; embedded put "
          f"{record['embedded_put_gbps']:.2f}, get {record['embedded_get_gbps']:.2f} GB/s; memcpy "
          f"{record['memcpy_gbps']:.2f} GB/s; lookup of {LOOKUP_KEYS} keys p99 {p99} us closed loop, {paced} us "
          f"paced (median of p50s {statistics.median(record['lookup_p50_us']):.0f} us); load average "
          f"{record['load_average']:.1f}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier bench daemon", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())
