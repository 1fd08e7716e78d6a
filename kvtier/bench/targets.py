"""The project's performance targets (from its issues), checked against a ``kvtier bench all`` directory.

Each target reads the fields it needs and reports ``not measured`` when they are absent, so a benchmark
that does not run on this machine (remote without a server, the GPU figures on a CPU machine) leaves a row
that says so instead of an error.

Promises: ``check_targets(results)`` returns one ``Target`` per target and measured case, in a fixed order;
``status`` is ``met``, ``missed`` or ``not measured``; ``measured`` says the figures behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvtier.bench.results import Results, number, series

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
_MiB = 2**20
_REPLAY_SLACK = 0.003  # 0.3 points of hit ratio (issue 13)


@dataclass(frozen=True)
class Target:
    area: str
    target: str
    measured: str
    status: str


def _status(ok: bool) -> str:
    return MET if ok else MISSED


def _host(results: Results) -> Iterator[Target]:
    target = "put and get >= 0.8x the best raw copy (1 thread, the store's N, or torch's on N) for 1 MiB blocks"
    for record in results.records("host"):
        sizes, puts, gets = (series(record, n) for n in ("block_bytes", "put_vs_memcpy", "get_vs_memcpy"))
        if sizes and puts and gets and _MiB in sizes:
            i = sizes.index(_MiB)
            single, threaded = series(record, "memcpy_gbps"), series(record, "memcpy_threads_gbps")
            pooled = series(record, "torch_copy_gbps")
            # Records from before the N-thread baseline compared with one thread only: say so.
            raw = (f"raw {single[i]:.1f} GB/s 1 thread, {threaded[i]:.1f} GB/s {record.get('transfer_workers', 'N')} "
                   f"threads" if single and threaded else "raw: 1 thread only")
            raw += f", torch {pooled[i]:.1f} GB/s" if pooled else ""
            yield Target("host tier", target, f"put {puts[i]:.2f}x, get {gets[i]:.2f}x ({raw})",
                         _status(min(puts[i], gets[i]) >= 0.8))
            break
    else:
        yield Target("host tier", target, "", NOT_MEASURED)
    yield from _per_call(results)
    for record in results.records("host"):
        for name in sorted(record):
            ratio = number(record, name)
            # The fill without a prefault is the reference the prefault is measured against, not kvtier's.
            if "first_fill" in name and "no_prefault" not in name and name.endswith("vs_memcpy") and ratio is not None:
                yield Target("host tier", "first fill of a fresh arena >= 0.5x memcpy", f"{ratio:.2f}x ({name})",
                             _status(ratio >= 0.5))


def _per_call(results: Results) -> Iterator[Target]:
    """One chunk per put or get (issue 26): within 1.2x of the better raw copy of the same bytes."""
    found = False
    for record in results.records("host"):
        for name in ("1b", "7b"):
            put, get = number(record, f"per_call_{name}_put_vs_raw"), number(record, f"per_call_{name}_get_vs_raw")
            if put is None or get is None:
                continue
            found = True
            figures = {field: number(record, f"per_call_{name}_{field}") for field in (
                "put_ms", "get_ms", "raw_1t_ms", "raw_threads_ms", "raw_torch_ms", "raw_put_1t_ms",
                "raw_put_threads_ms", "raw_put_torch_ms")}
            yield Target("host tier", f"one {name.upper()}-like chunk per call: put and get <= 1.2x the best raw",
                         f"put {put:.2f}x ({figures['put_ms']} ms; raw {figures['raw_put_1t_ms']} ms 1 thread, "
                         f"{figures['raw_put_threads_ms']} ms N threads, {figures['raw_put_torch_ms']} ms torch), "
                         f"get {get:.2f}x ({figures['get_ms']} ms; raw {figures['raw_1t_ms']} / "
                         f"{figures['raw_threads_ms']} / {figures['raw_torch_ms']} ms)",
                         _status(max(put, get) <= 1.2))
    if not found:
        yield Target("host tier", "one chunk per call: put and get <= 1.2x the better raw copy", "", NOT_MEASURED)


def _per_call_peers(results: Results) -> Iterator[Target]:
    """One chunk per put or get (issue 26): below LMCache's, measured in the same rounds (``bench peers``)."""
    target = "one chunk per call: put and get below LMCache's (same process, same rounds)"
    found = False
    for record in results.records("peers"):
        put, get = number(record, "put_vs_lmcache"), number(record, "get_vs_lmcache")
        if "per_call" not in record or put is None or get is None:
            continue
        found = True
        ms = {name: record.get(name) for name in ("put_ms", "get_ms", "lmcache_put_ms", "lmcache_get_ms")}
        yield Target("host tier vs LMCache", target,
                     f"{record['per_call'].upper()}-like: put {put:.2f}x, get {get:.2f}x LMCache's (kvtier put "
                     f"{ms['put_ms']} ms, get {ms['get_ms']} ms; LMCache {ms['lmcache_put_ms']} ms, "
                     f"{ms['lmcache_get_ms']} ms)", _status(max(put, get) < 1.0))
    if not found:
        yield Target("host tier vs LMCache", target, "", NOT_MEASURED)


def _disk(results: Results) -> Iterator[Target]:
    target = "write and read >= 0.9x raw O_DIRECT on the same filesystem"
    found = False
    for record in sorted(results.records("disk"), key=lambda r: number(r, "block_bytes") or 0):
        write, read, size = number(record, "write_vs_raw"), number(record, "read_vs_raw"), number(record, "block_bytes")
        if write is None or read is None:
            continue
        found = True
        direct = "" if record.get("direct_io", True) else " (no O_DIRECT: page cache)"
        label = f"{size / 1024:.0f} KiB blocks: " if size else ""
        yield Target("disk tier", target, f"{label}write {write:.2f}x, read {read:.2f}x{direct}",
                     _status(min(write, read) >= 0.9))
    if not found:
        yield Target("disk tier", target, "", NOT_MEASURED)
    target = "64-block prefix lookup with the blocks on disk <= 1.2x the same lookup in host"
    lookups = [r for r in results.records("disk") if number(r, "lookup_disk_vs_host") is not None]
    if lookups:
        ratio = min(number(r, "lookup_disk_vs_host") or 0.0 for r in lookups)  # the least loaded of the steps
        best = next(r for r in lookups if number(r, "lookup_disk_vs_host") == ratio)
        yield Target("disk tier", target, f"{ratio:.2f}x ({best.get('lookup_disk_us')} us on disk, "
                     f"{best.get('lookup_host_us')} us in host; best of {len(lookups)} runs)", _status(ratio <= 1.2))
    else:
        yield Target("disk tier", target, "", NOT_MEASURED)


def _daemon(results: Results) -> Iterator[Target]:
    records = results.records("daemon")
    put = next((number(r, "put_ratio_1_client") for r in records if number(r, "put_ratio_1_client") is not None), None)
    get = next((number(r, "get_ratio_1_client") for r in records if number(r, "get_ratio_1_client") is not None), None)
    target = "put and get >= 0.8x the embedded store (1 client)"
    if put is None or get is None:
        yield Target("daemon", target, "", NOT_MEASURED)
    else:
        yield Target("daemon", target, f"put {put:.2f}x, get {get:.2f}x", _status(min(put, get) >= 0.8))
    target = "64-key lookup p99 <= 1 ms with 4 clients"
    for record in records:
        clients, p99 = series(record, "clients"), series(record, "lookup_p99_us")
        if clients and p99 and 4 in clients and len(p99) == len(clients):
            value = p99[clients.index(4)]
            paced = series(record, "paced_lookup_p99_us")
            extra = f" (paced, 1 lookup/ms/client: {paced[clients.index(4)]:.0f} us)" if paced and len(paced) == len(
                clients) else ""
            yield Target("daemon", target, f"{value:.0f} us closed loop{extra}", _status(value <= 1000))
            return
    yield Target("daemon", target, "", NOT_MEASURED)


def _remote(results: Results) -> Iterator[Target]:
    target = "put (lent and copied) and get >= 0.8x the raw pipelined client"
    found = False
    for record in results.records("remote"):
        values = [number(record, n) for n in ("remote_put_gbps", "raw_put_gbps", "remote_get_gbps", "raw_get_gbps")]
        if any(v is None or (i % 2 and v == 0) for i, v in enumerate(values)):
            continue
        put_ratio, get_ratio = values[0] / values[1], values[2] / values[3]  # type: ignore[operator]
        copied = number(record, "remote_put_copied_gbps")  # the demotion path (records since it was measured)
        copied_ratio = copied / values[1] if copied is not None else None  # type: ignore[operator]
        found = True
        shown = f"put {put_ratio:.2f}x" + (f", copied put {copied_ratio:.2f}x" if copied_ratio is not None else "")
        yield Target(f"remote ({record.get('mode', '?')})", target, f"{shown}, get {get_ratio:.2f}x",
                     _status(min(put_ratio, get_ratio, copied_ratio or put_ratio) >= 0.8))
    if not found:
        reasons = [str(step.get("reason", "")) for step in results.steps_of("remote") if step.get("reason")]
        yield Target("remote", target, reasons[0] if reasons else "", NOT_MEASURED)


def _replay(results: Results) -> Iterator[Target]:
    records = []
    for record in results.records("replay"):
        best = max((number(record, f"baselines.{n}") or 0.0 for n in ("lru", "s3fifo", "arc")), default=0.0)
        hit = number(record, "block_hit_ratio")
        disk, unique = number(record, "disk_blocks"), number(record, "unique_blocks")
        if hit is not None and disk is not None and unique:
            records.append((round(100 * disk / unique, 1), hit, best, record))
    if not records:
        yield Target("replay", "never below the best classic baseline (0.3-point slack)", "", NOT_MEASURED)
        return
    records.sort(key=lambda item: item[0])
    below = [f"{disk:g}%: {100 * hit:.1f} vs {100 * best:.1f}" for disk, hit, best, _ in records
             if hit < best - _REPLAY_SLACK]
    shown = ", ".join(f"{disk:g}%: {100 * hit:.1f} vs {100 * best:.1f}" for disk, hit, best, _ in records)
    yield Target("replay", "never below the best classic baseline (0.3-point slack)",
                 f"kvtier vs best classic, % hit, by disk size: {shown}", _status(not below))
    for disk, hit, _, record in records:
        belady = number(record, "baselines.belady")
        if round(disk) == 1 and belady:
            yield Target("replay", "at 1% disk, >= 0.5x Belady", f"{hit / belady:.2f}x ({100 * hit:.1f} vs "
                         f"{100 * belady:.1f}% hit)", _status(hit >= 0.5 * belady))
    for disk, _, _, record in records:
        written, admit_all = number(record, "disk_blocks_written"), number(record, "baseline_disk_blocks_written")
        if written is None or not admit_all:
            continue
        limit = 1 / 3 if disk <= 2.0 else 1.0
        yield Target("replay", f"disk writes <= {'1/3 of ' if limit < 1 else ''}admit-all at {disk:g}%",
                     f"{written / admit_all:.2f}x admit-all", _status(written <= limit * admit_all))


def _ttft(results: Results) -> Iterator[Target]:
    found = False
    for record in results.records("ttft"):
        tokens = record.get("prompt_tokens")
        for name, value in record.items():
            if name.endswith("_within_target") and isinstance(value, bool):
                found = True
                tier = name.removesuffix("_within_target")
                ratio = number(record, f"{tier}_vs_target")
                source = f" ({record['source']})" if "source" in record else ""
                yield Target("ttft", f"{tier} restore + tail within 1.25x of KV bytes / bandwidth + the tail's prefill",
                             f"{tokens} tokens{source}: {ratio:.3f}x" if ratio is not None else f"{tokens} tokens",
                             _status(value))
    if not found:
        yield Target("ttft", "restore + tail within 1.25x of KV bytes / bandwidth + tail", "", NOT_MEASURED)
    yield from _cpu_restore(results)
    yield from _gpu_speedups(results)
    yield from _gpu_check(results)


def _cpu_restore(results: Results) -> Iterator[Target]:
    """Issue 20: on the CPU a restore from the host tier runs at >= 0.5x a raw copy of the same bytes."""
    target = "on the CPU, restore from the host tier >= 0.5x a raw copy of the same bytes"
    ratios = [(record.get("prompt_tokens"), number(record, "restore_vs_raw")) for record in results.records("ttft")
              if record.get("source") == "host" and record.get("device") == "cpu"]
    measured = [(tokens, ratio) for tokens, ratio in ratios if ratio is not None]
    if measured:
        yield Target("ttft", target, ", ".join(f"{tokens} tokens: {ratio:.2f}x" for tokens, ratio in measured),
                     _status(min(ratio for _, ratio in measured) >= 0.5))
    else:
        yield Target("ttft", target, "", NOT_MEASURED)


# Issue 20's GPU targets as ``make gpu-check`` names them in its ``targets`` section (TTFT speedups above).
_GPU_TARGETS = (
    ("store (GPU)", "store_put_vs_raw", "Store.put from the device >= 0.9x raw pinned copies"),
    ("store (GPU)", "store_get_vs_raw", "Store.get into the device >= 0.9x raw pinned copies"),
    ("store (GPU)", "restore8_vs_link", "an 8-block restore within 1.5x of link time"),
    ("vllm (GPU)", "vllm_worker_save_vs_raw", "vLLM worker save >= 0.8x raw"),
    ("vllm (GPU)", "vllm_worker_load_vs_raw", "vLLM worker load >= 0.8x raw"),
    ("transformers (GPU)", "transformers_restore_vs_h2d", "transformers restore >= 0.8x host-to-device"),
    ("decode (GPU)", "decode_slowdown_during_save", "a decode step during a concurrent save <= 1.1x as long"),
)


def _gpu_check(results: Results) -> Iterator[Target]:
    found = (results.gpu_check or {}).get("targets", {})
    for area, name, target in _GPU_TARGETS:
        entry = found.get(name) if isinstance(found, dict) else None
        value = number(entry, "value") if isinstance(entry, dict) else None
        if value is None or not isinstance(entry, dict) or not isinstance(entry.get("met"), bool):
            yield Target(area, target, "no gpu-check.json with this figure", NOT_MEASURED)
        else:
            yield Target(area, target, f"{value:.3g} ({entry.get('target')})", _status(entry["met"]))


def _gpu_records(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _gpu_records(item)
    elif isinstance(value, list):
        for item in value:
            yield from _gpu_records(item)


def _gpu_speedups(results: Results) -> Iterator[Target]:
    """TTFT at 8k and 32k tokens on a GPU (issue 10), from ``gpu-check.json`` wherever it holds such records."""
    for tokens, factor in ((8192, 2.0), (32768, 5.0)):
        target = f"on a GPU, TTFT with kvtier >= {factor:g}x faster than recompute at {tokens // 1024}k tokens"
        speedups = [number(r, "speedup") for r in _gpu_records(results.gpu_check)
                    if number(r, "prompt_tokens") == tokens]
        measured = [s for s in speedups if s is not None]
        if measured:
            yield Target("ttft (GPU)", target, ", ".join(f"{s:.1f}x" for s in measured),
                         _status(min(measured) >= factor))
        else:
            yield Target("ttft (GPU)", target, "no gpu-check.json with this prompt length", NOT_MEASURED)


def check_targets(results: Results) -> list[Target]:
    """Every target against ``results`` (see the module docstring)."""
    return [target for check in (_host, _per_call_peers, _disk, _daemon, _remote, _replay, _ttft)
            for target in check(results)]

